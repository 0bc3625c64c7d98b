"""The `blynkota` command group (see console/__init__.py for what each part talks to)."""

import os
import sys
import time
from pathlib import Path

import click
from flask.cli import ScriptInfo

from ..app import BadSettings, create_app_for_commands
from ..cli import admins, devices, import_blynk
from ..config import ConfigError, load_settings
from ..status_text import describe, render
from ..store import DeviceState
from .client import AdminClient, AdminError, Target

__all__ = ["blynkota", "finished"]


def _settings():
    try:
        return load_settings()
    except ConfigError as error:
        raise BadSettings(str(error)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="BLYNKOTA_CONFIG",
    help="server.properties file (env BLYNKOTA_CONFIG); relative paths in it are from its folder.",
)
@click.option(
    "--data-folder",
    type=click.Path(file_okay=False, path_type=Path),
    help="data folder (as data.folder): the SQLite database, firmware, TLS pair.",
)
@click.pass_context
def blynkota(ctx: click.Context, config: Path | None, data_folder: Path | None) -> None:
    """blynkota: over-the-air firmware updates for Blynk devices (ESP8266/ESP32)."""
    # Read by load_settings in every part (the server, the database commands).
    if config is not None:
        os.environ["BLYNKOTA_CONFIG"] = str(config.absolute())
    if data_folder is not None:
        os.environ["BLYNKOTA_DATA_FOLDER"] = str(data_folder.absolute())
    # The database commands are the `flask` CLI's: they find the app here.
    ctx.obj = ScriptInfo(create_app=create_app_for_commands, set_debug_flag=False)


# --- the server -------------------------------------------------------------------


@blynkota.command()
@click.argument("role", type=click.Choice(["all", "devices"]), default="all")
@click.option("--workers", type=click.IntRange(1, 64), default=1, help="device processes")
def serve(role: str, workers: int) -> None:
    """Run the server: everything in one process (all), or the device port only (devices)."""
    from ..serving import main

    argv = [role] + (["--workers", str(workers)] if workers != 1 else [])
    sys.exit(main(argv))


# --- provisioning, on the database ----------------------------------------------------

devices.add_command(import_blynk)  # also `blynkota devices import-blynk`
blynkota.add_command(devices)
blynkota.add_command(admins)


# --- through a running server's admin API -----------------------------------------------


def _connection_options(command):
    options = [
        click.option(
            "--url",
            envvar="BLYNKOTA_URL",
            help="admin API, e.g. https://ota.example.com:9443 (env BLYNKOTA_URL; "
            "default: this machine's https.port)",
        ),
        click.option(
            "--admin",
            "email",
            help="admin e-mail (default: admin.email of the configuration, "
            "env BLYNKOTA_ADMIN_EMAIL)",
        ),
        click.option(
            "--password",
            help="admin password (default: admin.pass, env BLYNKOTA_ADMIN_PASS)",
        ),
        click.option(
            "--ca-file",
            type=click.Path(dir_okay=False, path_type=Path),
            envvar="BLYNKOTA_CA_FILE",
            help="CA or certificate to trust (env BLYNKOTA_CA_FILE; default: the "
            "server's own certificate when it is on this machine)",
        ),
        click.option("--insecure", is_flag=True, help="do not check the server's certificate"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _client(url, email, password, ca_file, insecure) -> AdminClient:
    """Flags first, then the environment, then the configuration (BLYNKOTA_CONFIG)."""
    settings = _settings()
    if url is None:
        host = settings.listen_address
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"https://{f'[{host}]' if ':' in host else host}:{settings.https_port}"
    if ca_file is None and not insecure and settings.ssl_cert.is_file():
        ca_file = settings.ssl_cert  # self-signed: the certificate is its own CA
    try:
        return AdminClient(
            Target(
                url=url.rstrip("/"),
                email=email or settings.admin_email,
                password=password or settings.admin_pass,
                ca_file=ca_file,
                insecure=insecure,
            )
        )
    except AdminError as error:
        raise click.UsageError(str(error)) from None


def _call(action):
    try:
        return action()
    except AdminError as error:
        raise click.ClickException(str(error)) from None


@blynkota.group()
def firmware() -> None:
    """Upload firmware and start its rollout (through the admin API)."""


@firmware.command("upload")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--token", help="one device: its update starts now (or at its next login)")
@click.option("--user", help="a user's devices (e-mail)")
@click.option("--project", help="with --user: one project (name or dashboard id)")
@click.option("--tag", help="only the devices carrying this tag (with --user/--project too)")
@click.option("--dry-run", is_flag=True, help="say which devices it would take in; start nothing")
@click.option("--now", is_flag=True, default=None, help="offer connected devices at once")
@click.option("--queue", is_flag=True, help="with --token: keep it for an offline device")
@click.option("--percent", type=click.IntRange(1, 100), help="share of the devices")
@click.option("--waves", help="growing shares, e.g. 1,10,50,100")
@click.option("--success", type=click.IntRange(1, 100), help="%% of a wave updated to go on")
@click.option("--max-concurrent", type=click.IntRange(1, 1_000_000))
@click.option("--max-attempts", type=click.IntRange(1, 100))
@click.option("--attempt-timeout", help="90, 15m, 24h")
@click.option("--abort-ratio", help="pause above this failure share, e.g. 0.2")
@click.option("--wave-delay", help="time between waves: 30m, 1d")
@click.option("--health-window", help="time a device verifies the update: 10m, 1h, 0 for none")
@click.option("--start-at", help="ISO 8601 time to start at (2026-12-24T02:00:00+01:00)")
@click.option("--window", help="daily offer window, e.g. 02:00-05:00")
@click.option("--tz", help="zone of --window and --start-at (Europe/Berlin)")
@click.option(
    "--yes", is_flag=True, help="with no target: start it for every device without asking"
)
@_connection_options
def upload(file: Path, token, user, project, tag, dry_run, now, queue, percent, waves, success,
           max_concurrent, max_attempts, attempt_timeout, abort_ratio, wave_delay,
           health_window, start_at, window, tz, yes, **connection) -> None:  # fmt: skip
    """Upload FILE and roll it out; prints the rollout id. With no --token,
    --user or --project it reaches every device: asked first (a dry run's count)."""
    if token and (user or project):
        raise click.UsageError("give --token (one device) or --user/--project, not both")
    if token and dry_run:
        raise click.UsageError("--dry-run is for campaigns (--user/--project or everyone)")
    query = {
        "token": token,
        "user": user,
        "project": project,
        "tag": tag,
        "dryRun": "true" if dry_run else None,
        "now": None if now is None else "true",
        "queue": "true" if queue else None,
        "percent": percent,
        "waves": waves,
        "success": success,
        "maxConcurrent": max_concurrent,
        "maxAttempts": max_attempts,
        "attemptTimeout": attempt_timeout,
        "abortRatio": abort_ratio,
        "waveDelay": wave_delay,
        "healthWindow": health_window,
        "startAt": start_at,
        "window": window,
        "tz": tz,
    }
    client = _client(**connection)
    everyone = not (token or user or project or tag or dry_run)
    if everyone and not yes:
        if not sys.stdin.isatty():
            raise Refusal(
                "with no --token, --user or --project this starts a rollout to every device: "
                "add --yes to start it (--dry-run shows them first)"
            )
        plan = _send(client, file, {**query, "dryRun": "true"})
        click.confirm(f"{_planned(plan)} Start it for every device?", abort=True, err=True)
    answer = _send(client, file, query)
    if dry_run:
        click.echo(f"Dry run: {_planned(answer)} Nothing was started.")
        return
    firmware = answer.get("firmware") or {}
    version = f", version {firmware['title']}" if firmware.get("fw_version") else ""
    reused = " (the same bytes as a stored firmware: reused)" if firmware.get("reused") else ""
    started = "started"
    if answer.get("state") == "scheduled":
        started = f"scheduled for {answer['start_at']}"
    click.echo(
        f"Rollout {answer['rollout']} {started}: {answer['devices']} device(s), "
        f"build {answer['build']}, file {answer['path']}{version}{reused}"
    )


class Refusal(click.ClickException):
    """One line and exit 2, as for a wrong setting."""

    exit_code = 2


def _send(client: AdminClient, file: Path, query: dict):
    """POST the file to /admin/ota/start with `query`, with a progress bar on stderr."""
    size = file.stat().st_size
    with click.progressbar(length=size, label=f"Uploading {file.name}", file=sys.stderr) as bar:
        return _call(lambda: client.upload("/admin/ota/start", query, file, bar.update))


def _planned(answer: dict) -> str:
    """A dry run's answer in words: "build X (esp8266), 12 device(s) would be taken in now"."""
    incompatible = answer["incompatible"]
    version = f"version {answer['fw_version']}, " if answer.get("fw_version") else ""
    return (
        f"{version}build {answer['build']} ({answer['chip'] or 'any chip'}), "
        f"{len(answer['devices'])} device(s) would be taken in now"
        + (f", {len(incompatible)} incompatible" if incompatible else "")
        + "."
    )


@blynkota.group()
def rollout() -> None:
    """Look at and steer rollouts (through the admin API)."""


def finished(summary: dict) -> bool:
    """Nothing left to do: ended, or every device met has an outcome (its
    health window passed) and a campaign has met every device its target
    names (it waits for the rest)."""
    if summary["state"] in ("stopped", "superseded", "complete"):
        return True
    counts = summary["counts"]
    busy = sum(counts.get(state, 0) for state in DeviceState.OPEN)
    unmet = (summary.get("targeted") or 0) > summary["device_count"]
    return busy == 0 and not unmet


@rollout.command("status")
@click.argument("rollout_id", type=click.IntRange(1), required=False)
@click.option("--watch", is_flag=True, help="refresh until the rollout has nothing left to do")
@click.option("--interval", type=click.FloatRange(0.2, 3600), default=2.0, show_default=True)
@click.option("--timeout", type=click.FloatRange(0), default=0, help="stop watching after N s")
@_connection_options
def status(rollout_id, watch, interval, timeout, **connection) -> None:
    """Every rollout, or ROLLOUT_ID's, with a progress bar; --watch follows it live."""
    client = _client(**connection)

    def summaries() -> list[dict]:
        found = _call(lambda: client.request("GET", "/admin/ota/status", {"rollout": rollout_id}))
        if rollout_id is not None and not found:
            raise click.ClickException(f"No rollout {rollout_id}.")
        return found

    started = time.monotonic()
    while True:
        shown = summaries()
        text = render(shown)
        if watch and sys.stdout.isatty():
            click.clear()
        click.echo(text)
        if not watch or all(finished(summary) for summary in shown):
            return
        if timeout and time.monotonic() - started >= timeout:
            raise click.ClickException(f"still running after {timeout:g} s")
        time.sleep(interval)
        if not sys.stdout.isatty():
            click.echo("")


def _steer(action: str, help_text: str):
    @rollout.command(action, help=help_text)
    @click.argument("rollout_id", type=click.IntRange(1))
    @_connection_options
    def command(rollout_id: int, **connection) -> None:
        client = _client(**connection)
        summary = _call(
            lambda: client.request("POST", f"/admin/ota/rollouts/{rollout_id}/{action}")
        )
        click.echo(describe(summary))

    return command


for _action, _help in (
    ("pause", "Pause ROLLOUT_ID: no new offers until it is resumed."),
    ("resume", "Resume ROLLOUT_ID."),
    ("stop", "Stop ROLLOUT_ID: its pending devices are cancelled."),
    ("retry", "Give ROLLOUT_ID's failed devices a fresh set of attempts."),
):
    _steer(_action, _help)
