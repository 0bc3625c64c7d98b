"""What a start answers (the Blynk plain-text path, or JSON with the rollout)."""

from dataclasses import asdict, dataclass

from ..store import Firmware
from .firmware.catalog import identity_of

__all__ = ["Started", "firmware_answer"]


@dataclass(frozen=True)
class Started:
    """What a start answers: the file's path (Blynk's plain-text answer), and in
    JSON also the rollout id every later call needs and the devices it aims at."""

    path: str
    rollout: int
    scope: str
    devices: int  # registered devices in the rollout's scope
    build: str | None
    # The firmware sent: its identity (catalog.identity_of), its name, and
    # whether the upload's bytes were a stored firmware already.
    firmware: dict | None = None
    # A single-device start whose device is downloading an earlier offer:
    # this one waits for that download to end (the JSON answer says so).
    waiting: str | None = None
    state: str = "active"  # or "scheduled" (startAt=): it starts at start_at
    start_at: str | None = None

    def as_json(self) -> dict:
        return asdict(self)


def firmware_answer(firmware: Firmware) -> dict:
    return {"name": firmware.name, **identity_of(firmware), "reused": firmware.reused}
