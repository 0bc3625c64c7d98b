"""The OTA domain's refusals as HTTP answers: the status is chosen here, once."""

from ..ota import Conflict, NotFound, OtaError, Refused

__all__ = ["TooLarge", "status_of"]


class TooLarge(Refused):
    """An upload over ota.max.size: a request the server will not read."""


_STATUSES = ((TooLarge, 413), (NotFound, 404), (Conflict, 409), (Refused, 400))


def status_of(error: OtaError) -> int:
    for kind, status in _STATUSES:
        if isinstance(error, kind):
            return status
    return 400
