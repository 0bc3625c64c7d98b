"""The admin API described in OpenAPI 3.0, served at /admin/openapi.json.

Kept true by tests/test_openapi.py: every admin route of the Flask app is
here with its methods (and nothing else is), and schemathesis sends generated
requests for each operation to a running server, none of which may get a 5xx.
"""

from .openapi_schemas import (
    AUDIT_PAGE,
    DELETED,
    DEVICES,
    FIRMWARE_LIST,
    ROLLOUT,
    ROLLOUT_DETAIL,
    ROLLOUTS,
    SPEC,
    TAGGED,
    WEBHOOKS,
)

__all__ = ["OPENAPI"]


def _query(name: str, description: str, schema: dict | None = None) -> dict:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _path(name: str, description: str) -> dict:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _answers(ok: dict, *errors: int) -> dict:
    reasons = {
        400: "a wrong request: the reason in one line",
        401: "no credentials",
        403: "wrong credentials, plain HTTP, or an address not allowed",
        404: "no such rollout, device or file",
        409: "not now: in use, or in a state that does not allow it",
        413: "the file is larger than ota.max.size",
        429: "too many failed logins: wait Retry-After seconds",
        503: "the database is unavailable: try again after Retry-After seconds",
    }
    text = {"text/plain": {"schema": {"type": "string"}}}
    answers = {"200": ok}
    for status in (400, 401, 403, 429, 503, *errors):
        answers[str(status)] = {"description": reasons[status], "content": text}
    return answers


_TEXT_OK = {"description": "done", "content": {"text/plain": {"schema": {"type": "string"}}}}


def _json(schema: dict, description: str = "done") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# A start answers the path as text (Blynk's answer), or JSON on Accept: application/json.
_STARTED = {
    "description": "started: the file's path, or with Accept: application/json "
    "{path, rollout, scope, devices, build, firmware, waiting}",
    "content": {
        "text/plain": {"schema": {"type": "string"}},
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "rollout": {"type": "integer"},
                    "scope": {"type": "string"},
                    "devices": {"type": "integer"},
                    "build": {"type": "string", "nullable": True},
                    "firmware": {
                        "type": "object",
                        "nullable": True,
                        "description": "the firmware sent: its identity, and whether "
                        "the upload's bytes were a stored firmware already",
                        "properties": {
                            "name": {"type": "string"},
                            "title": {"type": "string"},
                            "fw_version": {"type": "string", "nullable": True},
                            "fw_type": {"type": "string", "nullable": True},
                            "lib_version": {"type": "string", "nullable": True},
                            "signed_by": {"type": "string", "nullable": True},
                            "reused": {"type": "boolean"},
                        },
                    },
                    "waiting": {
                        "type": "string",
                        "nullable": True,
                        "description": "why a single-device update waits (a download under way)",
                    },
                    "state": {"type": "string", "enum": ["active", "scheduled"]},
                    "start_at": {
                        "type": "string",
                        "nullable": True,
                        "description": "startAt=: when a scheduled rollout starts (UTC)",
                    },
                },
            }
        },
    },
}
_FLAG = {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"]}
_INT = {"type": "integer"}
_ROLLOUT = {
    "name": "rollout_id",
    "in": "path",
    "required": True,
    "description": "a rollout id",
    "schema": {"type": "integer", "minimum": 1},
}
_FIRMWARE_UPLOAD = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        }
    },
}
_CAMPAIGN = [
    _query("token", "one device: send the update to it now (or queue=true)"),
    _query("user", "only this user's devices (e-mail)"),
    _query("project", "with user: only this project's devices (name or dashboard id)"),
    _query("tag", "only the devices (of the user or project, if given) carrying this tag"),
    _query("queue", "with token: keep it pending for an offline device", _FLAG),
    _query("now", "offer connected devices at once", _FLAG),
    _query("percent", "a stable share of the devices", {"type": "integer"}),
    _query("waves", "growing shares, e.g. 10,50,100"),
    _query("success", "with waves: the share updated that grows a wave", {"type": "integer"}),
    _query("dryRun", "list the devices it would target; nothing is stored", _FLAG),
    _query("maxConcurrent", "download slots of this rollout (ota.max.concurrent)", _INT),
    _query("attemptTimeout", "seconds (or 15m, 24h) an attempt may take (ota.attempt.timeout)"),
    _query("maxAttempts", "attempts per device (ota.max.attempts)", _INT),
    _query("abortRatio", "failure share that pauses it, 0 to 1 (ota.abort.failure.ratio)"),
    _query("waveDelay", "with waves: the least time (90s, 15m, 24h) between two waves"),
    _query(
        "startAt",
        "ISO 8601 time (2026-12-24T02:00:00+01:00; without an offset: in tz): the rollout "
        "is created scheduled and starts then",
    ),
    _query(
        "window",
        "daily offer window HH:MM-HH:MM (02:00-05:00; across midnight allowed): offers only "
        "inside it; downloads begun inside may finish",
    ),
    _query(
        "tz", "the zone of window and startAt (IANA, e.g. Europe/Berlin; default: the server's)"
    ),
    _query(
        "healthWindow",
        "time (10m, 1h; 0: none) a device verifies the new build before it counts as "
        "updated (ota.health.window)",
    ),
    _query(
        "allowDowngrade",
        "offer devices on a newer firmware version (or build) than the image's too",
        _FLAG,
    ),
]


def _rollout_action(summary: str, *extra: dict) -> dict:
    return {
        "post": {
            "summary": summary,
            "parameters": [_ROLLOUT, *extra],
            "responses": _answers(_json(ROLLOUT, "the rollout as it is now"), 404),
        }
    }


OPENAPI = {
    "openapi": "3.0.3",
    "info": {
        "title": "blynkota admin API",
        "version": "1",
        "description": "Blynk-compatible OTA routes and rollout control; HTTPS, basic auth.",
    },
    "components": {"securitySchemes": {"basic": {"type": "http", "scheme": "basic"}}},
    "security": [{"basic": []}],
    "paths": {
        "/admin/ota/start": {
            "post": {
                "summary": "Upload a firmware and start its rollout (the Blynk answer: the path)",
                "parameters": _CAMPAIGN,
                "requestBody": _FIRMWARE_UPLOAD,
                "responses": _answers(_STARTED, 413),
            },
            "get": {
                "summary": "Send an uploaded file again to one device",
                "parameters": [
                    _query("fileName", "the served name from an earlier upload"),
                    _query("token", "the device"),
                    _query("queue", "keep it pending for an offline device", _FLAG),
                    _query(
                        "allowDowngrade", "send it even if it is older than the device's", _FLAG
                    ),
                ],
                "responses": _answers(_STARTED),
            },
        },
        "/admin/ota/stop": {
            method: {
                "summary": "Stop every running rollout, or ?rollout=<id>",
                "parameters": [_query("rollout", "one rollout id", {"type": "integer"})],
                "responses": _answers(_TEXT_OK),
            }
            for method in ("get", "post")
        },
        "/admin/ota/status": {
            "get": {
                "summary": "Every rollout with its counts, newest first",
                "parameters": [
                    _query("rollout", "only this rollout", {"type": "integer"}),
                    _query("limit", "only the newest N", {"type": "integer"}),
                ],
                "responses": _answers(_json(ROLLOUTS)),
            }
        },
        "/admin/ota/rollouts/{rollout_id}": {
            "get": {
                "summary": "One rollout with a row per device",
                "parameters": [_ROLLOUT],
                "responses": _answers(_json(ROLLOUT_DETAIL), 404),
            }
        },
        "/admin/ota/rollouts/{rollout_id}/pause": _rollout_action("Pause a rollout"),
        "/admin/ota/rollouts/{rollout_id}/resume": _rollout_action("Resume a paused rollout"),
        "/admin/ota/rollouts/{rollout_id}/stop": _rollout_action("Stop one rollout"),
        "/admin/ota/rollouts/{rollout_id}/retry": _rollout_action(
            "Give the rollout's failed devices a fresh set of attempts"
        ),
        "/admin/ota/rollouts/{rollout_id}/expand": _rollout_action(
            "Widen a rollout's share",
            {**_query("percent", "the new share", {"type": "integer"}), "required": True},
        ),
        "/admin/devices": {
            "get": {
                "summary": "Every device, or those the filters match (X-Total-Count: how many)",
                "parameters": [
                    _query(
                        "search",
                        "a token's start, a log tag (t:…), a tag, or part of a "
                        "name, user, project, build or firmware version",
                    ),
                    _query("tag", "only devices carrying this tag"),
                    _query("user", "only this user's devices (e-mail)"),
                    _query("project", "only devices of projects of this name"),
                    _query("build", "only devices reporting this build"),
                    _query("online", "only online (true) or offline (false) devices", _FLAG),
                    _query("offset", "devices to skip", {"type": "integer", "minimum": 0}),
                    _query("limit", "devices to return", {"type": "integer", "minimum": 1}),
                ],
                "responses": _answers(_json(DEVICES)),
            }
        },
        "/admin/devices/{token}/tags": {
            "post": {
                "summary": "Put ?tag= on a device",
                "parameters": [
                    _path("token", "the device's token"),
                    {**_query("tag", "the tag"), "required": True},
                ],
                "responses": _answers(_json(TAGGED), 404),
            }
        },
        "/admin/devices/{token}/tags/{tag}": {
            "delete": {
                "summary": "Take a tag off a device",
                "parameters": [_path("token", "the device's token"), _path("tag", "the tag")],
                "responses": _answers(_json(TAGGED), 404),
            }
        },
        "/admin/devices/{token}": {
            "delete": {
                "summary": "Remove a device and its rows in every rollout",
                "parameters": [_path("token", "the device's token")],
                "responses": _answers(_json(DELETED), 404, 409),
            }
        },
        "/admin/audit": {
            "get": {
                "summary": "The audit trail, newest first: who changed what, from where",
                "parameters": [
                    _query("offset", "entries to skip", {"type": "integer", "minimum": 0}),
                    _query("limit", "entries to return (50)", {"type": "integer", "minimum": 1}),
                ],
                "responses": _answers(_json(AUDIT_PAGE)),
            }
        },
        "/admin/webhooks": {
            "get": {
                "summary": "Each notify.webhook.urls URL: deliveries by state, the latest outcome",
                "responses": _answers(_json(WEBHOOKS)),
            }
        },
        "/admin/firmware": {
            "get": {
                "summary": "Every uploaded firmware",
                "responses": _answers(_json(FIRMWARE_LIST)),
            }
        },
        "/admin/firmware/{name}": {
            "delete": {
                "summary": "Stop serving an uploaded file (its rows stay for history)",
                "parameters": [_path("name", "the served name (24 hex digits)")],
                "responses": _answers(_json(DELETED), 404, 409),
            }
        },
        "/admin/openapi.json": {
            "get": {"summary": "This description", "responses": _answers(_json(SPEC))}
        },
    },
}
