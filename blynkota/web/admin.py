"""The admin API (HTTPS): the Blynk OTA routes, answered as the Blynk server answers them."""

from dataclasses import asdict
from datetime import datetime

from flask import Blueprint, Response, current_app, g, jsonify, request

from ..numbers import ROW_ID_MAX, fraction, seconds, whole_number
from ..ota import (
    Controls,
    ControlsError,
    DeviceFilter,
    NotFound,
    OtaError,
    Refused,
    Started,
    Upload,
)
from ..ota.fleet.blynk_data import is_token
from ..ota.fleet.login_limits import TooManyAttempts
from ..ota.fleet.registry import ProvisioningError
from ..ota.fleet.tags import check_tag
from ..ota.rollouts.cohorts import parse_waves
from ..ota.rollouts.schedule import ScheduleError, parse_start_at, parse_window, zone
from ..store import utcnow
from .audit import audit_request
from .auth import ADMIN, OPERATOR, VIEWER, auth, guard_admin_request
from .csrf import check_csrf
from .errors import TooLarge, status_of
from .openapi import OPENAPI
from .parameters import unknown_parameter

__all__ = ["admin", "parse_rollout_id"]

admin = Blueprint("admin", __name__, url_prefix="/admin")

STATUS_LIMIT = 100_000  # largest ?limit= of /admin/ota/status


def _text(body: str, status: int = 200) -> Response:
    return Response(body, status, mimetype="text/plain")


def _service():
    return current_app.extensions["blynkota"].admin


@admin.before_request
def _guard():
    refused = guard_admin_request() or check_csrf()
    if refused is not None:
        return refused
    unknown = unknown_parameter()
    if unknown is None:
        return None
    # Answered as the route would be: credentials first, so a stranger learns nothing.
    return auth.login_required(lambda: _text(unknown, 400))()


admin.after_request(audit_request)


@admin.errorhandler(TooManyAttempts)
def _too_many_attempts(error: TooManyAttempts) -> Response:
    answer = _text(f"{error}\n", 429)
    answer.headers["Retry-After"] = str(error.retry_after)
    return answer


@admin.errorhandler(OtaError)
def _request_error(error: OtaError) -> Response:
    return _text(str(error), status_of(error))


def _uploaded_file() -> Upload:
    # Blynk accepts the file under any field name; the docs use `file`.
    if not request.files:
        raise Refused(
            "No firmware file in the request: send it as multipart form data, "
            "e.g. curl -F file=@firmware.bin."
        )
    storage = request.files.get("file") or next(iter(request.files.values()))
    limit = current_app.config["SETTINGS"].ota_max_size
    data = storage.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"The firmware is larger than ota.max.size ({limit} bytes).")
    return Upload(data=data, filename=storage.filename or "")


def _flag(name: str) -> bool:
    value = request.args.get(name, "false").lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise Refused(f"{name} must be true or false, not {value!r}.")
    return value in ("true", "1", "yes")


@admin.route("/ota/start", methods=["GET", "POST"])
@auth.login_required(role=OPERATOR)
def start_ota() -> Response:
    service, who = _service(), auth.current_user()
    token = request.args.get("token")
    if token is not None and ("user" in request.args or "project" in request.args):
        raise Refused("Give token (one device) or user/project (a campaign), not both.")
    campaign_only = [name for name in CAMPAIGN_ONLY if name in request.args]
    if token is not None and campaign_only:
        raise Refused(f"{', '.join(campaign_only)}: for campaigns, not one device (token).")
    queue = _flag("queue")  # offline device: keep the update pending for its next login
    if request.method == "GET":
        file_name = request.args.get("fileName")
        if not file_name or not token:
            raise Refused(
                "GET /admin/ota/start re-sends an uploaded file: give fileName and token "
                "(upload a new file with POST)."
            )
        return _started(
            service.resend(
                file_name, token, who, queue=queue, allow_downgrade=_flag("allowDowngrade")
            )
        )
    if token is not None:
        # Checked before the upload is read, as the Blynk server does.
        return _started(
            service.start_for_device(
                token,
                _uploaded_file(),
                who,
                queue=queue,
                allow_downgrade=_flag("allowDowngrade"),
            )
        )
    user, project = request.args.get("user"), request.args.get("project")
    controls = _controls()
    if controls.dry_run:
        return jsonify(
            service.dry_run(_uploaded_file(), user=user, project=project, controls=controls)
        )
    return _started(
        service.start_campaign(_uploaded_file(), who, user=user, project=project, controls=controls)
    )


def _started(started: Started) -> Response:
    """Blynk's answer (the file's path, plain text) unless the client asks for JSON."""
    g.audit_rollout = started.rollout  # for the audit trail (audit.py)
    g.audit_firmware = (started.firmware or {}).get("name")
    if request.accept_mimetypes.best_match(["text/plain", "application/json"]) == (
        "application/json"
    ):
        return jsonify(started.as_json())
    return _text(started.path)


def _number(name: str, low: int, high: int) -> int | None:
    value = request.args.get(name)
    if value is None:
        return None
    number = whole_number(value, low=low, high=high)
    if number is None:
        raise Refused(f"{name} must be a whole number from {low} to {high}, not {value!r}.")
    return number


def parse_rollout_id(value: str) -> int:
    """A rollout id from the path or the query; a 400 naming it if it cannot be one."""
    number = whole_number(value, low=1, high=ROW_ID_MAX)
    if number is None:
        raise Refused(f"rollout must be a rollout id (a whole number), not {value!r}.")
    return number


def _duration(name: str, low: int, high: int) -> int | None:
    value = request.args.get(name)
    if value is None:
        return None
    number = seconds(value, low=low, high=high)
    if number is None:
        raise Refused(
            f"{name} must be a duration from {low} to {high} seconds (90, 90s, 15m, 24h, 7d), "
            f"not {value!r}."
        )
    return number


def _ratio(name: str) -> float | None:
    value = request.args.get(name)
    if value is None:
        return None
    number = fraction(value)
    if number is None:
        raise Refused(f"{name} must be a share from 0 to 1 (0.2), not {value!r}.")
    return number


# Parameters of a campaign's start that one device's (?token=) has no use for.
CAMPAIGN_ONLY = (
    "now", "percent", "waves", "success", "dryRun", "maxConcurrent", "attemptTimeout",
    "maxAttempts", "abortRatio", "waveDelay", "healthWindow", "startAt", "window", "tz", "tag",
)  # fmt: skip


def _schedule() -> dict:
    """startAt=, window= and tz=, checked (schedule.py)."""
    window, start_at = request.args.get("window"), request.args.get("startAt")
    if "tz" in request.args and window is None and start_at is None:
        raise Refused("tz needs window or startAt: it is the zone they are read in.")
    try:
        tz = zone(request.args.get("tz"))
        return {
            "window": None if window is None else parse_window(window),
            "window_tz": tz if window is not None else None,
            "start_at": None if start_at is None else parse_start_at(start_at, tz, utcnow()),
        }
    except ScheduleError as error:
        raise Refused(str(error)) from None


def _controls() -> Controls:
    """now=, percent=, waves=, success=, dryRun=, the rollout's own limits, its
    start time and offer window."""
    schedule = _schedule()
    try:
        waves, tag = request.args.get("waves"), request.args.get("tag")
        return Controls(
            **schedule,
            tag=None if tag is None else check_tag(tag),
            push_online=_flag("now") if "now" in request.args else None,
            percent=_number("percent", 1, 100),
            waves=parse_waves(waves) if waves is not None else (),
            success_percent=_number("success", 1, 100),
            dry_run=_flag("dryRun"),
            max_concurrent=_number("maxConcurrent", 1, 1_000_000),
            attempt_timeout=_duration("attemptTimeout", 1, 7 * 86400),
            max_attempts=_number("maxAttempts", 1, 100),
            abort_ratio=_ratio("abortRatio"),
            wave_delay=_duration("waveDelay", 1, 90 * 86400),
            health_window=_duration("healthWindow", 0, 7 * 86400),
            allow_downgrade=_flag("allowDowngrade"),
        )
    except (ControlsError, ProvisioningError) as error:
        raise Refused(str(error)) from None


def _rollout_id() -> int | None:
    value = request.args.get("rollout")
    return None if value is None else parse_rollout_id(value)


@admin.route("/ota/stop", methods=["GET", "POST"])
@auth.login_required(role=OPERATOR)
def stop_ota() -> Response:
    """Stop every running rollout, or only ?rollout=<id>."""
    stopped = _service().stop(auth.current_user(), _rollout_id())
    return _text(f"Stopped {stopped} rollout(s).")


@admin.get("/ota/status")
@auth.login_required(role=VIEWER)
def ota_status() -> Response:
    """Newest first; ?rollout=ID for one, ?limit=N for the newest N (the dashboard polls it)."""
    return jsonify(_service().status(_rollout_id(), limit=_number("limit", 1, STATUS_LIMIT)))


@admin.get("/ota/rollouts/<rollout_id>")
@auth.login_required(role=VIEWER)
def rollout_detail(rollout_id: str) -> Response:
    rollout = parse_rollout_id(rollout_id)
    return jsonify(_service().detail(rollout))


@admin.post("/ota/rollouts/<rollout_id>/pause")
@auth.login_required(role=OPERATOR)
def pause_rollout(rollout_id: str) -> Response:
    rollout = parse_rollout_id(rollout_id)
    return jsonify(_service().pause(rollout, auth.current_user()))


@admin.post("/ota/rollouts/<rollout_id>/resume")
@auth.login_required(role=OPERATOR)
def resume_rollout(rollout_id: str) -> Response:
    rollout = parse_rollout_id(rollout_id)
    return jsonify(_service().resume(rollout, auth.current_user()))


@admin.post("/ota/rollouts/<rollout_id>/stop")
@auth.login_required(role=OPERATOR)
def stop_rollout(rollout_id: str) -> Response:
    rollout = parse_rollout_id(rollout_id)
    service = _service()
    service.stop(auth.current_user(), rollout)
    return jsonify(service.status(rollout)[0])


@admin.post("/ota/rollouts/<rollout_id>/expand")
@auth.login_required(role=OPERATOR)
def expand_rollout(rollout_id: str) -> Response:
    rollout = parse_rollout_id(rollout_id)
    percent = _number("percent", 1, 100)
    if percent is None:
        raise Refused("expand needs ?percent=N (the new share of devices, up to 100).")
    return jsonify(_service().expand(rollout, percent, auth.current_user()))


@admin.post("/ota/rollouts/<rollout_id>/retry")
@auth.login_required(role=OPERATOR)
def retry_rollout(rollout_id: str) -> Response:
    """The rollout's failed devices get a fresh set of attempts."""
    rollout = parse_rollout_id(rollout_id)
    return jsonify(_service().retry(rollout, auth.current_user()))


def _jsonable(row: dict) -> dict:
    return {
        key: value.isoformat() + "Z" if isinstance(value, datetime) else value
        for key, value in row.items()
    }


@admin.get("/openapi.json")
@auth.login_required(role=VIEWER)
def openapi() -> Response:
    return jsonify(OPENAPI)


@admin.get("/devices")
@auth.login_required(role=VIEWER)
def list_devices() -> Response:
    """Every device, or those the filters and search match; ?offset=&limit= page
    through them (X-Total-Count says how many match)."""
    online = request.args.get("online")
    found = DeviceFilter(
        search=request.args.get("search"),
        tag=request.args.get("tag"),
        user=request.args.get("user"),
        project=request.args.get("project"),
        build=request.args.get("build"),
        online=None if online is None else _flag("online"),
    )
    offset = _number("offset", 0, 2**31 - 1) or 0
    limit = _number("limit", 1, 100_000)
    rows, total = current_app.extensions["blynkota.fleet"].devices_page(found, offset, limit)
    answer = jsonify([_jsonable(asdict(row)) for row in rows])
    answer.headers["X-Total-Count"] = str(total)
    return answer


@admin.post("/devices/<token>/tags")
@auth.login_required(role=OPERATOR)
def tag_device(token: str) -> Response:
    """Put ?tag= on the device; DELETE /admin/devices/<token>/tags/<tag> takes it off."""
    return jsonify(_tagged(token, request.args.get("tag") or "", remove=False))


@admin.delete("/devices/<token>/tags/<tag>")
@auth.login_required(role=OPERATOR)
def untag_device(token: str, tag: str) -> Response:
    return jsonify(_tagged(token, tag, remove=True))


def _tagged(token: str, tag: str, *, remove: bool) -> dict:
    fleet = current_app.extensions["blynkota.fleet"]
    if not is_token(token):
        raise NotFound("No such device.")
    try:
        changed, unknown = fleet.tag_devices(tag, [token], remove=remove)
    except ProvisioningError as error:
        raise Refused(str(error)) from None
    if unknown:
        raise NotFound("No such device.")
    (row,), _ = fleet.devices_page(DeviceFilter(search=token), 0, 1)
    return {"device": row.tag, "tags": list(row.tags), "changed": changed}


AUDIT_PAGE_LIMIT = 1000  # largest ?limit= of /admin/audit


@admin.get("/audit")
@auth.login_required(role=VIEWER)
def audit_trail() -> Response:
    """Newest first: ?offset= and ?limit= (50 by default) page through it."""
    offset = _number("offset", 0, 2**31 - 1) or 0
    limit = _number("limit", 1, AUDIT_PAGE_LIMIT) or 50
    entries, total = current_app.extensions["blynkota.audit"].page(offset, limit)
    return jsonify({"total": total, "offset": offset, "entries": entries})


@admin.get("/webhooks")
@auth.login_required(role=VIEWER)
def list_webhooks() -> Response:
    """Each webhook URL: its deliveries by state and the latest attempt's outcome."""
    return jsonify(_service().webhooks())


@admin.get("/firmware")
@auth.login_required(role=VIEWER)
def list_firmware() -> Response:
    return jsonify(current_app.extensions["blynkota"].catalog.listing())


@admin.delete("/firmware/<name>")
@auth.login_required(role=ADMIN)
def delete_firmware(name: str) -> Response:
    """Stop serving an uploaded file; 409 while a running rollout sends it."""
    return jsonify(_service().delete_firmware(name, auth.current_user()))


@admin.delete("/devices/<token>")
@auth.login_required(role=ADMIN)
def delete_device(token: str) -> Response:
    """Remove a device and its rows in every rollout; 409 while an update is in flight."""
    return jsonify(_service().delete_device(token, auth.current_user()))
