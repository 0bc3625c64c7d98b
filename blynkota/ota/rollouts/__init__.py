"""The rollout engine: which rollout a device is in (candidates.py, targeting.py,
cohorts.py), what it may run (compatibility.py), its update states
(device_states.py, one table) and their lifecycle, offers (offering.py, one rule
set for both ways in), rollout states (planner.py), waves and failure
thresholds (guards.py), connected devices entered (enrolment.py), and what
the admin API shows of it all (status.py)."""

from .candidates import Candidate
from .cohorts import Controls, ControlsError
from .device_states import TRANSITIONS, IllegalDeviceTransition
from .guards import FleetPolicy
from .health import HealthPolicy
from .lifecycle import RetryPolicy

__all__ = [
    "Candidate",
    "Controls",
    "ControlsError",
    "TRANSITIONS",
    "IllegalDeviceTransition",
    "FleetPolicy",
    "HealthPolicy",
    "RetryPolicy",
]
