"""What the OTA domain answers when it will not do what it was asked.

Each is a kind of refusal, not a status code: web/ maps them to HTTP
answers (web/errors.py), the command line to one line and exit code 1. The
message is the whole answer, written for the person who asked.
"""

__all__ = ["Conflict", "NotFound", "OtaError", "ProvisioningError", "Refused"]


class OtaError(Exception):
    """A request the domain cannot carry out; the message says why."""


class Refused(OtaError):
    """The request itself is wrong: a bad parameter, a firmware that may not be sent."""


class NotFound(OtaError):
    """The request names something that does not exist (a rollout, a device, a file)."""


class Conflict(OtaError):
    """The request is right, but the state of things forbids it now (in use, already done)."""


class ProvisioningError(ValueError):
    """A device, tag or account cannot be added or changed as asked; the message says why."""
