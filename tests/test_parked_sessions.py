"""An idle device holds no greenlet: its session parks on the event loop.

Each scenario (tests/parked_scenarios.py) runs the device server in a process
of its own, monkey-patched as in production, so that it can count the
greenlets alive in the server's process while devices sit idle.
"""

import subprocess
import sys

import pytest

from .conftest import _mysql_database
from .parked_scenarios import ON_MARIADB, SCENARIOS
from .servers import ROOT, clean_env


@pytest.mark.parametrize("scenario", sorted(set(SCENARIOS) - ON_MARIADB))
def test_parked_sessions(scenario):
    run_scenario(scenario)


@pytest.mark.mysql
@pytest.mark.parametrize("scenario", sorted(ON_MARIADB))
def test_parked_sessions_on_mariadb(scenario):
    with _mysql_database() as url:
        run_scenario(scenario, url)


def run_scenario(scenario: str, *arguments: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.parked_scenarios", scenario, *arguments],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
