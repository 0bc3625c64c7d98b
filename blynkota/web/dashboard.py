"""The dashboard at /admin/ (HTTPS, the same admins): rollouts, one rollout's devices,
the fleet, firmware upload. Server-rendered with Jinja; a little plain
JavaScript (static/dashboard.js) refreshes the numbers from the JSON API and
shows the upload's progress. No build step.

Every button is a form carrying the CSRF token (csrf.py); the upload goes
to the API's /admin/ota/start with the token in a header.
"""

from urllib.parse import urlencode

from flask import Blueprint, Response, current_app, redirect, render_template, request, url_for

from ..numbers import in_words, whole_number
from ..ota import Conflict, DeviceFilter, NotFound, OtaError, ProvisioningError, Refused
from ..ota.notifications import where
from ..store import DeviceState
from .admin import parse_rollout_id
from .audit import audit_request
from .auth import OPERATOR, VIEWER, auth, guard_admin_request
from .csrf import check_csrf, csrf_token
from .errors import status_of

__all__ = ["dashboard"]

dashboard = Blueprint(
    "dashboard",
    __name__,
    url_prefix="/admin",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)

PAGE_SIZE = 50  # devices per page of a rollout
ROLLOUTS_SHOWN = 50  # newest rollouts on the first page
ACTIONS = ("pause", "resume", "stop", "retry", "expand")
# The progress bar's segments, in order, with the states each one adds up.
SEGMENTS = (
    ("updated", (DeviceState.UPDATED,)),
    ("verifying", (DeviceState.VERIFYING,)),
    ("in-flight", DeviceState.IN_FLIGHT),
    ("pending", (DeviceState.PENDING,)),
    ("failed", (DeviceState.FAILED,)),
    ("incompatible", (DeviceState.INCOMPATIBLE,)),
    ("ended", (DeviceState.CANCELLED, DeviceState.SUPERSEDED)),
)


dashboard.after_request(audit_request)


@dashboard.before_request
def _guard():
    return guard_admin_request() or check_csrf()


@dashboard.context_processor
def _helpers() -> dict:
    return {"csrf_token": csrf_token, "segments": segments, "action_allowed": action_allowed}


@dashboard.app_template_filter("span")
def span(seconds: float | None) -> str:
    """Seconds as people read them: "10 min"; "none" for 0."""
    return "none" if not seconds else in_words(seconds)


@dashboard.app_template_filter("when")
def when(stamp: str | None) -> str:
    """An API timestamp (2026-11-28T18:59:31.032473Z) as people read it, to the second."""
    if not stamp:
        return ""
    return stamp[:19].replace("T", " ") + " UTC"


# Which buttons a rollout's state allows (dashboard.js ALLOWED says the same).
ALLOWED = {
    "pause": ("active", "complete"),
    "resume": ("paused",),
    "stop": ("scheduled", "active", "paused", "complete"),
    "retry": ("active", "paused", "complete"),
    "expand": ("active", "paused", "complete"),
}


def action_allowed(rollout: dict, action: str) -> bool:
    allowed = rollout["state"] in ALLOWED.get(action, ())
    if action == "retry":
        return allowed and rollout["counts"].get("failed", 0) > 0
    if action == "expand":
        return allowed and rollout["percent"] < 100
    return allowed


def segments(rollout: dict) -> list[dict]:
    """The bar of one rollout: each segment's name, count and share of its devices."""
    total = rollout["device_count"] or 0
    parts = []
    for name, states in SEGMENTS:
        count = sum(rollout["counts"].get(state, 0) for state in states)
        parts.append(
            {"name": name, "count": count, "share": 100.0 * count / total if total else 0.0}
        )
    return parts


def _page_asked() -> int:
    """?page=, from 1."""
    page = whole_number(request.args.get("page", "1"), low=1, high=10**9)
    if page is None:
        raise Refused("page must be a whole number from 1.")
    return page


def _pages(total: int) -> int:
    return max(1, -(-total // PAGE_SIZE))


def _service():
    return current_app.extensions["blynkota"].admin


@dashboard.errorhandler(OtaError)
def _request_error(error: OtaError) -> Response:
    return Response(str(error).rstrip("\n") + "\n", status_of(error), mimetype="text/plain")


@dashboard.get("/")
@auth.login_required(role=VIEWER)
def rollouts() -> str:
    newest = _service().status(limit=ROLLOUTS_SHOWN + 1)  # one more: are there older ones?
    return render_template(
        "dashboard/rollouts.html",
        rollouts=newest[:ROLLOUTS_SHOWN],
        older=len(newest) > ROLLOUTS_SHOWN,
        poll=f"/admin/ota/status?limit={ROLLOUTS_SHOWN}",
        notice=request.args.get("notice"),
    )


@dashboard.get("/rollouts/<rollout_id>")
@auth.login_required(role=VIEWER)
def rollout(rollout_id: str) -> str:
    number = parse_rollout_id(rollout_id)
    found = _service().status(number)
    if not found:
        raise NotFound(f"No rollout {number}.")
    state = request.args.get("state") or None
    if state is not None and state not in DeviceState.ALL:
        raise Refused(f"state must be one of {', '.join(DeviceState.ALL)}, not {state!r}.")
    page = _page_asked()
    devices, total = _service().devices_page(number, state, (page - 1) * PAGE_SIZE, PAGE_SIZE)
    pages = _pages(total)

    def page_url(to: int) -> str:
        query = {"page": to, **({"state": state} if state else {})}
        return url_for("dashboard.rollout", rollout_id=number) + "?" + urlencode(query)

    return render_template(
        "dashboard/rollout.html",
        rollout=found[0],
        devices=devices,
        total=total,
        state=state,
        states=DeviceState.ALL,
        page=page,
        pages=pages,
        page_url=page_url,
        poll=f"/admin/ota/status?rollout={number}",
        notice=request.args.get("notice"),
    )


@dashboard.post("/rollouts/<rollout_id>/action")
@auth.login_required(role=OPERATOR)
def rollout_action(rollout_id: str) -> Response:
    number = parse_rollout_id(rollout_id)
    action = request.form.get("action", "")
    if action not in ACTIONS:
        raise Refused(f"action must be one of {', '.join(ACTIONS)}, not {action!r}.")
    service, who = _service(), auth.current_user()
    try:
        if action == "pause":
            service.pause(number, who)
        elif action == "resume":
            service.resume(number, who)
        elif action == "stop":
            if not service.stop(who, number):
                raise Conflict("it is not running.")
        elif action == "retry":
            service.retry(number, who)
        else:
            percent = whole_number(request.form.get("percent", ""), low=1, high=100)
            if percent is None:
                raise Refused("expand needs a percent from 1 to 100.")
            service.expand(number, percent, who)
        notice = f"Rollout {number}: {action} done."
    except OtaError as error:
        notice = f"Rollout {number}: {action} refused: {str(error).strip()}"
    target = url_for("dashboard.rollout", rollout_id=number) + "?" + urlencode({"notice": notice})
    return redirect(target, 303)


@dashboard.get("/fleet/devices")
@auth.login_required(role=VIEWER)
def devices() -> str:
    """The device list: search and filters, a page at a time."""
    page = _page_asked()
    online = {"yes": True, "no": False}.get(request.args.get("online", ""))
    found = DeviceFilter(
        search=request.args.get("search") or None,
        tag=request.args.get("tag") or None,
        online=online,
    )
    fleet = current_app.extensions["blynkota.fleet"]
    rows, total = fleet.devices_page(found, (page - 1) * PAGE_SIZE, PAGE_SIZE)
    query = {k: v for k, v in request.args.items() if k in ("search", "tag", "online") and v}
    return render_template(
        "dashboard/devices.html",
        devices=rows,
        total=total,
        found=found,
        page=page,
        pages=_pages(total),
        page_url=lambda to: url_for("dashboard.devices") + "?" + urlencode({**query, "page": to}),
    )


@dashboard.get("/fleet/devices/<device_id>")
@auth.login_required(role=VIEWER)
def device(device_id: str) -> str:
    """One device: what it reported, its connection, tags, rollouts and events."""
    number = whole_number(device_id, low=1, high=2**31 - 1)
    if number is None:
        raise NotFound(f"No device {device_id[:20]}.")
    return render_template(
        "dashboard/device.html", device=_service().device(number), notice=request.args.get("notice")
    )


@dashboard.post("/fleet/devices/<device_id>/tags")
@auth.login_required(role=OPERATOR)
def device_tags(device_id: str) -> Response:
    """The device page's tag form: put a tag on, or take one off (`remove`)."""
    number = whole_number(device_id, low=1, high=2**31 - 1)
    if number is None:
        raise NotFound(f"No device {device_id[:20]}.")
    remove = request.form.get("remove") == "true"
    fleet = current_app.extensions["blynkota.fleet"]
    rows, _ = fleet.devices_page(DeviceFilter(device_id=number), 0, 1)
    if not rows:
        raise NotFound(f"No device {number}.")
    try:
        fleet.tag_devices(request.form.get("tag", ""), [rows[0].token], remove=remove)
        notice = f"Tag {'removed' if remove else 'added'}."
    except ProvisioningError as error:
        notice = str(error)
    target = url_for("dashboard.device", device_id=number) + "?" + urlencode({"notice": notice})
    return redirect(target, 303)


@dashboard.get("/activity")
@auth.login_required(role=VIEWER)
def activity() -> str:
    """The audit trail, newest first, a page at a time."""
    page = _page_asked()
    audit = current_app.extensions["blynkota.audit"]
    entries, total = audit.page((page - 1) * PAGE_SIZE, PAGE_SIZE)
    return render_template(
        "dashboard/activity.html",
        entries=entries,
        total=total,
        page=page,
        pages=_pages(total),
        page_url=lambda to: url_for("dashboard.activity") + f"?page={to}",
    )


@dashboard.get("/fleet")
@auth.login_required(role=VIEWER)
def fleet() -> str:
    return render_template(
        "dashboard/fleet.html",
        fleet=_service().fleet_overview(),
        mode=_mode(),
        webhooks=[{**hook, "where": where(hook["url"])} for hook in _service().webhooks()],
    )


def _mode() -> dict:
    """Standalone, or relaying to the upstream Blynk server, and what this process
    knows of it (a process that holds no device has not tried it)."""
    settings = current_app.config["SETTINGS"]
    if settings.relay_upstream is None:
        return {"relay": False}
    host, port = settings.relay_upstream
    known = current_app.extensions["blynkota.readiness"].upstream
    return {
        "relay": True,
        "address": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "tls": settings.relay_ssl != "false",
        "state": known() if known is not None else None,
    }


@dashboard.get("/upload")
@auth.login_required(role=VIEWER)
def firmware() -> str:
    settings = current_app.config["SETTINGS"]
    return render_template(
        "dashboard/firmware.html",
        files=current_app.extensions["blynkota"].catalog.listing(),
        max_size=settings.ota_max_size,
    )
