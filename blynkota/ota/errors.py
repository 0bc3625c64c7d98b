"""The one error the admin API turns into an answer."""

__all__ = ["OtaRequestError"]


class OtaRequestError(Exception):
    """An admin request that cannot be carried out; the message is the answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
