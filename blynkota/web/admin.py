"""The admin API (HTTPS): the Blynk OTA routes, answered as the Blynk server answers them."""

from dataclasses import asdict
from datetime import datetime

from flask import Blueprint, Response, current_app, jsonify, request

from ..ota import OtaRequestError, Upload
from .auth import auth, guard_admin_request

__all__ = ["admin"]

admin = Blueprint("admin", __name__, url_prefix="/admin")


def _text(body: str, status: int = 200) -> Response:
    return Response(body, status, mimetype="text/plain")


def _service():
    return current_app.extensions["blynkota"]


@admin.before_request
def _guard():
    return guard_admin_request()


@admin.errorhandler(OtaRequestError)
def _request_error(error: OtaRequestError) -> Response:
    return _text(str(error), error.status)


def _uploaded_file() -> Upload:
    # Blynk accepts the file under any field name; the docs use `file`.
    if not request.files:
        raise OtaRequestError(
            "No firmware file in the request: send it as multipart form data, "
            "e.g. curl -F file=@firmware.bin."
        )
    storage = request.files.get("file") or next(iter(request.files.values()))
    limit = current_app.config["SETTINGS"].ota_max_size
    data = storage.read(limit + 1)
    if len(data) > limit:
        raise OtaRequestError(f"The firmware is larger than ota.max.size ({limit} bytes).", 413)
    return Upload(data=data, filename=storage.filename or "")


@admin.route("/ota/start", methods=["GET", "POST"])
@auth.login_required
def start_ota() -> Response:
    service, who = _service(), auth.current_user()
    token = request.args.get("token")
    if request.method == "GET":
        file_name = request.args.get("fileName")
        if not file_name or not token:
            raise OtaRequestError(
                "GET /admin/ota/start re-sends an uploaded file: give fileName and token "
                "(upload a new file with POST)."
            )
        return _text(service.resend(file_name, token, who))
    if token is not None:
        # Checked before the upload is read, as the Blynk server does.
        return _text(service.start_for_device(token, _uploaded_file(), who))
    user, project = request.args.get("user"), request.args.get("project")
    return _text(service.start_campaign(_uploaded_file(), who, user=user, project=project))


@admin.route("/ota/stop", methods=["GET", "POST"])
@auth.login_required
def stop_ota() -> Response:
    stopped = _service().stop_all(auth.current_user())
    return _text(f"Stopped {stopped} rollout(s).")


def _jsonable(row: dict) -> dict:
    return {
        key: value.isoformat() + "Z" if isinstance(value, datetime) else value
        for key, value in row.items()
    }


@admin.get("/devices")
@auth.login_required
def list_devices() -> Response:
    fleet = current_app.extensions["blynkota.fleet"]
    return jsonify([_jsonable(asdict(row)) for row in fleet.list_devices()])


@admin.get("/firmware")
@auth.login_required
def list_firmware() -> Response:
    return jsonify(_service().list_firmware())
