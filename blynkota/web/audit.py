"""Every state-changing admin request, written to the audit trail as it is answered.

Registered after each request of the admin API and the dashboard: a write
(POST, DELETE), or one of the Blynk routes that change things on a GET
(`/admin/ota/start?fileName=`, `/admin/ota/stop`). A dry run changes nothing
and is left out. The entry names the device by its token's tag; the query
is kept without its token.
"""

from flask import Response, current_app, g, request

from ..logsafe import token_tag
from .auth import auth

__all__ = ["audit_request"]

_CHANGING_GETS = {"admin.start_ota", "admin.stop_ota"}
_VERBS = {
    "admin.start_ota": "start",
    "admin.stop_ota": "stop",
    "admin.pause_rollout": "pause",
    "admin.resume_rollout": "resume",
    "admin.stop_rollout": "stop",
    "admin.expand_rollout": "expand",
    "admin.retry_rollout": "retry",
    "admin.delete_firmware": "delete firmware",
    "admin.delete_device": "delete device",
}
_QUIET = {"token", "fileName"}  # said elsewhere in the entry (device, firmware)


def audit_request(response: Response) -> Response:
    """after_request: the entry for a state-changing request, whatever its answer."""
    changing = request.method not in ("GET", "HEAD", "OPTIONS") or (
        request.endpoint in _CHANGING_GETS
    )
    if not changing or request.args.get("dryRun", "").lower() in ("true", "1", "yes"):
        return response
    arguments = {**(request.view_args or {})}
    verb = _VERBS.get(request.endpoint or "", request.method.lower())
    if request.endpoint == "dashboard.rollout_action":
        verb = request.form.get("action", "action")[:16]
    token = request.args.get("token") or arguments.get("token")
    shown = "&".join(f"{k}={v}" for k, v in request.args.items(multi=True) if k not in _QUIET)
    rule = request.url_rule.rule if request.url_rule else request.path
    current_app.extensions["blynkota.audit"].record(
        admin=auth.current_user() or g.get("refused_admin") or "-",
        address=request.remote_addr or "-",
        action=verb,
        rollout_id=_rollout_of(arguments),
        device=token_tag(token) if token else None,
        firmware=_firmware_of(arguments),
        status=response.status_code,
        detail=f"{request.method} {rule}" + (f"?{shown}" if shown else ""),
    )
    return response


def _rollout_of(arguments: dict) -> int | None:
    for value in (arguments.get("rollout_id"), request.args.get("rollout")):
        if value and value.isascii() and value.isdigit() and len(value) < 10:
            return int(value)
    return g.get("audit_rollout")  # what a start made (web/admin.py)


def _firmware_of(arguments: dict) -> str | None:
    name = arguments.get("name") or request.args.get("fileName")
    if name:
        return name.rsplit("/", 1)[-1].removesuffix(".bin")
    return g.get("audit_firmware")
