"""Read a Blynk server's data folder: one JSON file per user (SPEC §6).

Files are named `<email>.<app>.user` or `u_<email>.user`; each holds
`profile.dashBoards[]` with the dashboard `id`, `name` and `devices[]`
(`id`, `token`, `boardType`, `name`). Very old files have no `devices` and
keep one token per dashboard in `dashTokens`.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "TOKEN_RULE",
    "BlynkDevice",
    "BlynkProject",
    "BlynkUser",
    "BlynkDataError",
    "is_token",
    "read_blynk_folder",
]

# A Blynk auth token: 32 characters, hex from the Blynk server, letters, digits,
# '-' and '_' from the Blynk cloud (URL-safe base64). Every way of provisioning
# a device checks it: a token a board cannot have is a typo.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{32}")
TOKEN_RULE = "32 characters: letters, digits, '-' or '_'"


def is_token(text: str) -> bool:
    return _TOKEN.fullmatch(text) is not None


class BlynkDataError(ValueError):
    """A file of the data folder cannot be read; the message names it."""


@dataclass(frozen=True)
class BlynkDevice:
    blynk_id: int | None
    token: str
    board_type: str | None
    name: str


@dataclass(frozen=True)
class BlynkProject:
    dash_id: int
    name: str
    devices: tuple[BlynkDevice, ...]


@dataclass(frozen=True)
class BlynkUser:
    email: str
    projects: tuple[BlynkProject, ...]


def _email_from_file_name(path: Path) -> str:
    stem = path.name.removesuffix(".user")
    if stem.startswith("u_"):
        return stem[2:]
    # <email>.<app>: the app name never contains a dot, the email may.
    return stem.rsplit(".", 1)[0] if stem.count(".") > 1 else stem


def _read_user(path: Path) -> BlynkUser:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BlynkDataError(f"{path.name}: not a Blynk user file ({error})") from None
    if not isinstance(document, dict):
        raise BlynkDataError(f"{path.name}: not a Blynk user file (no JSON object)")
    email = document.get("email") or _email_from_file_name(path)
    legacy_tokens = document.get("dashTokens") or {}
    projects = []
    for dashboard in (document.get("profile") or {}).get("dashBoards") or []:
        dash_id = dashboard.get("id")
        if not isinstance(dash_id, int):
            raise BlynkDataError(f"{path.name}: a dashboard has no numeric id")
        devices = [
            BlynkDevice(
                blynk_id=device.get("id"),
                token=device["token"],
                board_type=device.get("boardType"),
                name=device.get("name") or "",
            )
            for device in dashboard.get("devices") or []
            if device.get("token")
        ]
        legacy = legacy_tokens.get(str(dash_id))
        if not devices and legacy:
            devices.append(BlynkDevice(0, legacy, dashboard.get("boardType"), ""))
        for device in devices:
            if not isinstance(device.token, str) or not is_token(device.token):
                raise BlynkDataError(
                    f"{path.name}: dashboard {dash_id} has a token that is not {TOKEN_RULE}"
                )
        projects.append(BlynkProject(dash_id, dashboard.get("name") or "", tuple(devices)))
    return BlynkUser(email=email, projects=tuple(projects))


def read_blynk_folder(folder: Path) -> list[BlynkUser]:
    if not folder.is_dir():
        raise BlynkDataError(f"{folder} is not a folder")
    return [_read_user(path) for path in sorted(folder.glob("*.user"))]
