"""What a frame means, as frozen values: the codec's output and input."""

from dataclasses import dataclass

from ..numbers import whole_number

__all__ = [
    "IDENTITY_KEYS",
    "identity_words",
    "info_number",
    "Event",
    "Login",
    "Ping",
    "Response",
    "Internal",
    "Ignored",
    "Unknown",
    "INFO_KEYS",
]

# Keys of the info message the C++ library sends right after login, every
# generation: 0.6.x (`ver`, `fw`), 1.0-1.2 (`ver`, `fw-type`, `fw`) and 1.3.x
# on Arduino cores (`mcu` or `ncp`, `fw-type`, `blynk`, no `ver` and no `fw`).
INFO_KEYS = frozenset(
    {"ver", "h-beat", "buff-in", "dev", "cpu", "con", "fw", "fw-type", "build", "tmpl"}
    | {"mcu", "ncp", "blynk"}
)
# What a firmware says of itself, in the info message and in the image's
# `blnkinf` block alike: each from the first of its keys present, as the
# library generations name the same things differently.
IDENTITY_KEYS = {
    "fw_version": ("fw", "mcu", "ncp"),
    "fw_type": ("fw-type",),
    "lib_version": ("ver", "blynk"),
}


def identity_words(pairs: dict[str, str]) -> dict[str, str | None]:
    """fw_version, fw_type and lib_version from an info message's (or a
    block's) key/value pairs; None where none of the keys has a value."""
    return {
        name: next((pairs[key] for key in keys if pairs.get(key)), None)
        for name, keys in IDENTITY_KEYS.items()
    }


# An INTERNAL frame is an info message when its words are key/value pairs
# and one of its keys says what only an info message says: the library's
# timing and buffer (every generation sends them) or a version. Other
# INTERNAL frames a device sends (`rtc sync`, Edgent's `ota` progress...)
# have none of these keys.
_INFO_MARKS = frozenset({"h-beat", "buff-in", "ver", "blynk", "mcu", "ncp", "build"})


@dataclass(frozen=True)
class Login:
    msg_id: int
    token: str
    legacy: bool  # LOGIN (2) from old clients rather than HW_LOGIN (29)


@dataclass(frozen=True)
class Ping:
    msg_id: int


@dataclass(frozen=True)
class Response:
    msg_id: int
    status: int


@dataclass(frozen=True)
class Internal:
    """An INTERNAL frame: NUL-separated words (info message, `ota`, `rtc`, ...)."""

    msg_id: int
    words: tuple[str, ...]

    @property
    def is_info(self) -> bool:
        """Judged by its content, not its first key (1.3.x starts with `mcu`)."""
        return not _INFO_MARKS.isdisjoint(self.words[0::2])

    def info(self) -> dict[str, str]:
        """Key/value pairs of an info message; a key without value is dropped."""
        pairs = zip(self.words[0::2], self.words[1::2], strict=False)
        return {key: value for key, value in pairs if key}


def info_number(text: str | None) -> int | None:
    """A number of an info message (h-beat, buff-in): ASCII digits, at most 9 of them.

    Anything else (`²`, 400 digits, a sign) is no number at all: the field is
    ignored rather than the device refused.
    """
    return whole_number(text, high=999_999_999)


@dataclass(frozen=True)
class Ignored:
    """A known command the OTA server has no use for (HARDWARE, PROPERTY, ...)."""

    msg_id: int
    command: int
    body: bytes


@dataclass(frozen=True)
class Unknown:
    """A command type below 100 that no Blynk peer sends."""

    msg_id: int
    command: int


Event = Login | Ping | Response | Internal | Ignored | Unknown
