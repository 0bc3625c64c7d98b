"""Rollouts as text for a terminal: the same for `flask ota status` (on the
database) and `blynkota rollout status` (through the admin API), since both
read the same summaries (ota/rollouts/status.py, as GET /admin/ota/status
answers them).

A table of every rollout's counts, then each rollout with its progress bar
and why it waits; with a rollout's devices (its detail), their table last.
"""

from .store import DeviceState

__all__ = ["describe", "render", "table"]

BAR_WIDTH = 40
SEGMENTS = (  # (label, states, character) of the text progress bar
    ("updated", ("updated",), "#"),
    ("verifying", ("verifying",), "+"),
    ("in flight", DeviceState.IN_FLIGHT, ">"),
    ("pending", ("pending",), "."),
    ("failed", ("failed",), "x"),
    ("incompatible", ("incompatible",), "!"),
)


def table(rows: list[tuple[str, ...]]) -> str:
    """Columns padded to their widest cell, two spaces apart."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _counts(summaries: list[dict]) -> str:
    states = DeviceState.ALL
    rows = [("ID", "SCOPE", "TARGET", "BUILD", "STATE", *(s.upper() for s in states))]
    for summary in summaries:
        rows.append(
            (
                str(summary["id"]),
                summary["scope"],
                summary["target"],
                summary["firmware"]["build"] or "-",
                summary["state"],
                *(str(summary["counts"].get(state, 0)) for state in states),
            )
        )
    return table(rows)


def _bar(summary: dict) -> str:
    total = summary["device_count"] or 0
    counts = summary["counts"]
    cells, labels = "", []
    for label, states, mark in SEGMENTS:
        count = sum(counts.get(state, 0) for state in states)
        cells += mark * (round(BAR_WIDTH * count / total) if total else 0)
        labels.append(f"{label} {count}")
    cells = cells[:BAR_WIDTH].ljust(BAR_WIDTH)
    share = 100 * counts.get("updated", 0) // total if total else 0
    return f"[{cells}] {share:3d}%  " + "  ".join(labels) + f"  of {total}"


def describe(summary: dict) -> str:
    """One rollout: who started it and what for, its progress bar, why it waits."""
    lines = [
        f"rollout {summary['id']}  {summary['state']}  build {summary['firmware']['build']}  "
        f"target {summary['target']}  started by {summary['started_by']} {summary['started_at']}",
        _bar(summary),
    ]
    if summary.get("state") == "scheduled":
        lines.append(f"scheduled: starts at {summary['start_at']}")
    if summary.get("window_outlook"):
        lines.append(f"window: {summary['window_outlook']}")
    if summary.get("outcome"):
        lines.append(f"complete: {summary['outcome']}")
    if summary.get("reach"):
        lines.append(f"reach: {summary['reach']}")
    if summary.get("pause_reason"):
        lines.append(f"paused: {summary['pause_reason']}")
    if summary.get("next_wave"):
        lines.append(f"waiting: {summary['next_wave']}")
    return "\n".join(lines)


def _devices(devices: list[dict]) -> str:
    rows = [("TOKEN", "STATE", "ATTEMPTS", "LAST ERROR")]
    for device in devices:
        rows.append(
            (device["token"], device["state"], str(device["attempts"]), device["last_error"] or "-")
        )
    return table(rows)


def render(summaries: list[dict]) -> str:
    """The counts table, each rollout described, and the devices of a detail."""
    if not summaries:
        return "No rollout yet."
    parts = [_counts(summaries), *(describe(summary) for summary in summaries)]
    parts += [_devices(summary["devices"]) for summary in summaries if "devices" in summary]
    return "\n\n".join(parts)
