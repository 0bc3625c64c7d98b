"""The JSON answers of the admin API, as OpenAPI 3.0 schemas (openapi.py uses them).

Each names the fields a script may rely on, with their types; tests/test_openapi.py
checks the server's real answers against them. Objects may gain fields later
(additional properties are allowed): a client reads what it knows.
"""

__all__ = [
    "AUDIT_PAGE",
    "DELETED",
    "DEVICES",
    "FIRMWARE_LIST",
    "ROLLOUT",
    "ROLLOUT_DETAIL",
    "ROLLOUTS",
    "SPEC",
    "TAGGED",
    "WEBHOOKS",
]

_STRING = {"type": "string"}
_TEXT = {"type": "string", "nullable": True}
_INT = {"type": "integer"}
_COUNT = {"type": "integer", "minimum": 0}
_MAYBE_INT = {"type": "integer", "nullable": True}
_NUMBER = {"type": "number"}
_BOOL = {"type": "boolean"}
_TIME = {"type": "string", "nullable": True, "description": "ISO 8601, UTC (…Z)"}


def _object(required: dict, optional: dict | None = None, description: str = "") -> dict:
    schema = {
        "type": "object",
        "required": sorted(required),
        "properties": {**required, **(optional or {})},
    }
    if description:
        schema["description"] = description
    return schema


def _list(item: dict) -> dict:
    return {"type": "array", "items": item}


_FIRMWARE = _object(
    {
        "name": _STRING,
        "path": _STRING,
        "build": _TEXT,
        "original_name": _STRING,
        "chip": _TEXT,
        "fw_version": _TEXT,
        "fw_type": _TEXT,
        "lib_version": _TEXT,
        "signed_by": _TEXT,
        "title": _STRING,
    }
)
ROLLOUT = _object(
    {
        "id": _INT,
        "scope": {"type": "string", "enum": ["device", "project", "user", "all"]},
        "target": _STRING,
        "firmware": _FIRMWARE,
        "state": {
            "type": "string",
            "enum": ["scheduled", "active", "paused", "complete", "stopped", "superseded"],
        },
        "started_by": _STRING,
        "started_at": _TIME,
        "stopped_by": _TEXT,
        "stopped_at": _TIME,
        "superseded_by": _MAYBE_INT,
        "pause_reason": _TEXT,
        "push_online": {"type": "boolean", "nullable": True},
        "percent": _INT,
        "waves": {"type": "array", "items": _INT, "nullable": True},
        "success_percent": _MAYBE_INT,
        "device_count": _COUNT,
        "targeted": _MAYBE_INT,
        "seen": _MAYBE_INT,
        "reach": _TEXT,
        "outcome": _TEXT,
        "start_at": _TIME,
        "window": _TEXT,
        "window_outlook": _TEXT,
        "counts": {"type": "object", "additionalProperties": _COUNT},
        "already_up_to_date": _COUNT,
        "reverted": _COUNT,
        "allow_downgrade": _BOOL,
        "limits": _object(
            {
                "max_concurrent": _INT,
                "attempt_timeout": _NUMBER,
                "max_attempts": _INT,
                "abort_ratio": _NUMBER,
                "wave_delay": _MAYBE_INT,
                "health_window": _NUMBER,
            }
        ),
        "next_wave": _TEXT,
    },
    description="A rollout: its target, firmware, state, counts by device state and limits",
)
ROLLOUTS = _list(ROLLOUT)
_ROLLOUT_DEVICE = _object(
    {
        "token": _STRING,
        "name": _STRING,
        "state": _STRING,
        "attempts": _COUNT,
        "reverts": _COUNT,
        "health": _TEXT,
        "health_logins": _COUNT,
        "last_error": _TEXT,
        "bytes_sent": _MAYBE_INT,
        "already_up_to_date": _BOOL,
        "bucket": _MAYBE_INT,
        "wave": _MAYBE_INT,
        "offered_at": _TIME,
        "updated_at": _TIME,
        "failed_at": _TIME,
    }
)
ROLLOUT_DETAIL = {
    "allOf": [ROLLOUT, _object({"devices": _list(_ROLLOUT_DEVICE)})],
    "description": "A rollout, with a row per device",
}
DEVICES = _list(
    _object(
        {
            "token": _STRING,
            "name": _STRING,
            "user": _STRING,
            "project": _STRING,
            "dash_id": _INT,
            "build": _TEXT,
            "fw_version": _TEXT,
            "fw_type": _TEXT,
            "lib_version": _TEXT,
            "hardware": _TEXT,
            "last_seen_at": _TIME,
            "last_address": _TEXT,
            "online": _BOOL,
            "tag": _STRING,
            "tags": _list(_STRING),
            "id": _INT,
        }
    )
)
TAGGED = _object({"device": _STRING, "tags": _list(_STRING), "changed": _COUNT})
FIRMWARE_LIST = _list(
    {
        "allOf": [
            _FIRMWARE,
            _object(
                {
                    "size": _COUNT,
                    "md5": _STRING,
                    "sha256": _STRING,
                    "uploaded_by": _STRING,
                    "uploaded_at": _TIME,
                }
            ),
        ]
    }
)
DELETED = _object(
    {"deleted": _STRING},
    {"original_name": _STRING},
    description="what was deleted: a device's log tag, or a firmware's served name",
)
WEBHOOKS = _list(
    _object(
        {
            "url": _STRING,
            "since": _TIME,
            "pending": _COUNT,
            "delivered": _COUNT,
            "abandoned": _COUNT,
            "last_status": _MAYBE_INT,
            "last_error": _TEXT,
            "last_delivered_at": _TIME,
        }
    )
)
AUDIT_PAGE = _object(
    {
        "total": _COUNT,
        "offset": _COUNT,
        "entries": _list(
            _object(
                {
                    "id": _INT,
                    "at": _TIME,
                    "admin": _STRING,
                    "address": _STRING,
                    "action": _STRING,
                    "rollout": _MAYBE_INT,
                    "device": _TEXT,
                    "firmware": _TEXT,
                    "status": _INT,
                    "detail": _TEXT,
                }
            )
        ),
    }
)
SPEC = _object({"openapi": _STRING, "info": {"type": "object"}, "paths": {"type": "object"}})
