"""Values passed between the device side and the admin side of the OTA service."""

import secrets
from dataclasses import dataclass, field

from ..store import Rollout
from .catalog import served_path
from .rollouts import Candidate

__all__ = ["DeviceIdentity", "DownloadTicket", "Offer", "candidate_of", "new_offer"]


@dataclass(frozen=True)
class DeviceIdentity:
    id: int
    token: str
    project_id: int
    user_id: int


@dataclass(frozen=True)
class Offer:
    rollout_id: int
    device_id: int
    token: str
    firmware_id: int
    path: str  # /static/ota/<name>.bin, what the admin API answers
    key: str  # ties the download to this offer

    @property
    def url_path(self) -> str:
        return f"{self.path}?o={self.key}"


@dataclass
class DownloadTicket:
    """One tracked download: which rollout row it moves, and how far it got."""

    row_id: int
    size: int
    start: int
    written_until: int = field(default=0)


def new_offer(candidate: Candidate, device: DeviceIdentity) -> Offer:
    # 48 random bits, URL-safe: short enough for a 256-byte device buffer.
    return Offer(
        rollout_id=candidate.rollout_id,
        device_id=device.id,
        token=device.token,
        firmware_id=candidate.firmware_id,
        path=served_path(candidate.firmware_name),
        key=secrets.token_urlsafe(6),
    )


def candidate_of(rollout: Rollout) -> Candidate:
    firmware = rollout.firmware
    return Candidate(
        rollout.id,
        rollout.scope,
        firmware.id,
        firmware.name,
        firmware.build,
        state=rollout.state,
        percent=rollout.percent,
        cohort_seed=rollout.cohort_seed,
        waves=rollout.waves,
        chip=firmware.chip,
        fw_type=firmware.fw_type,
        fw_version=firmware.fw_version,
        allow_downgrade=rollout.allow_downgrade,
    )
