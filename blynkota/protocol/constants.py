"""Command types and status codes of the Blynk hardware protocol (v0.6.1)."""

from enum import IntEnum

__all__ = [
    "Command",
    "Status",
    "HEADER_SIZE",
    "OTA_MSG_ID",
    "KNOWN_UNHANDLED",
    "FIRST_RESERVED_COMMAND",
    "RESPONSE",
    "LOGIN",
    "HW_LOGIN",
    "PING",
    "INTERNAL",
]


class Command(IntEnum):
    RESPONSE = 0
    LOGIN = 2
    PING = 6
    TWEET = 12
    EMAIL = 13
    NOTIFY = 14
    BRIDGE = 15
    HW_SYNC = 16
    INTERNAL = 17
    SMS = 18
    PROPERTY = 19
    HARDWARE = 20
    HW_LOGIN = 29
    REDIRECT = 41
    DEBUG_PRINT = 55
    EVENT_LOG = 64


class Status(IntEnum):
    OK = 200
    ILLEGAL_COMMAND = 2
    ALREADY_REGISTERED = 4
    NOT_AUTHENTICATED = 5
    INVALID_TOKEN = 9
    ILLEGAL_COMMAND_BODY = 11
    SERVER_ERROR = 19


# The command types every frame is compared with, as plain ints for the codecs'
# hot paths: reading a member off an IntEnum goes through the enum type's
# __getattr__ hook, some twelve times the cost of a module global.
RESPONSE, LOGIN, HW_LOGIN, PING, INTERNAL = (
    int(command)
    for command in (Command.RESPONSE, Command.LOGIN, Command.HW_LOGIN, Command.PING,
                    Command.INTERNAL)
)  # fmt: skip

HEADER_SIZE = 5

# The server's `ota` command always carries this message id (the C++ library
# treats it as a write to InternalPinOTA whatever the id, but 7777 is what the
# Blynk server sends and what captures show).
OTA_MSG_ID = 7777

# Commands a device may send that an OTA server has no use for: the Blynk
# server's answer (ignore them) keeps such devices connected.
KNOWN_UNHANDLED = frozenset(
    {
        Command.TWEET,
        Command.EMAIL,
        Command.NOTIFY,
        Command.BRIDGE,
        Command.HW_SYNC,
        Command.SMS,
        Command.PROPERTY,
        Command.HARDWARE,
        Command.REDIRECT,
        Command.DEBUG_PRINT,
        Command.EVENT_LOG,
    }
)

# The Blynk server closes a connection that sends a command type at or above this.
FIRST_RESERVED_COMMAND = 100
