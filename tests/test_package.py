"""`pip install .` gives a working `blynkota` command, run from any folder: provisioning
on the database, the server, and the admin API's client against that server.

The venv sees this machine's site-packages, so pip only builds and installs
blynkota itself (its build backend, setuptools, comes from the package index).
"""

import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .images import esp8266_image
from .servers import ROOT, wait_for_ports

OLD, NEW = "Jan  1 2026 00:00:00", "Nov 28 2026 10:00:00"


def _requirement_names(lines: list[str]) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[<>=!~\[ ]", line)[0].lower().replace("_", "-"))
    return names


def test_the_package_declares_what_requirements_txt_installs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = (ROOT / "requirements.txt").read_text()
    runtime = requirements.split("# Tests and checks")[0].splitlines()
    tests = requirements.split("# Tests and checks")[1].splitlines()
    declared = _requirement_names(project["dependencies"])
    extras = _requirement_names(project["optional-dependencies"]["test"])
    assert _requirement_names(runtime) == declared | {"gunicorn", "honcho"}
    assert _requirement_names(tests) <= extras


@pytest.fixture(scope="module")
def blynkota_command(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("package")
    source = folder / "source"
    shutil.copytree(
        ROOT, source, ignore=shutil.ignore_patterns(".git", "data", "build", "*.egg-info",
                                                    "__pycache__", ".*_cache"),
    )  # fmt: skip
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    return venv / "bin" / "blynkota"


def _run(command: Path, *arguments: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(command), *arguments], cwd=cwd, capture_output=True, text=True, timeout=120, **kwargs
    )


def test_provisioning_commands_work_offline_from_any_folder(blynkota_command, tmp_path):
    data = ["--data-folder", str(tmp_path / "fleet")]
    added = _run(blynkota_command, *data, "devices", "add", "--user", "a@b.c", "--project", "P",
                 cwd=tmp_path)  # fmt: skip
    assert added.returncode == 0, added.stderr
    (tmp_path / "devices.csv").write_text(
        "token,user,project,name\n,farm@example.com,Farm,pump\nabc12300000000000000000000000000,farm@example.com,Farm,gate\n"
    )
    imported = _run(blynkota_command, *data, "devices", "import-csv", "devices.csv", cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith("Added 2 device(s), 1 with a new token")
    again = _run(blynkota_command, *data, "devices", "import-csv", "devices.csv", cwd=tmp_path)
    assert again.returncode == 1
    taken = "nothing added: device 2: Token abc12300000000000000000000000000 already belongs"
    assert taken in again.stderr
    exported = _run(blynkota_command, *data, "devices", "export-csv", cwd=tmp_path)
    rows = exported.stdout.splitlines()
    assert rows[0] == (
        "token,user,project,name,build,online,last_seen_at,fw_version,fw_type,lib_version,tags"
    )
    assert f"{added.stdout.strip()},a@b.c,P,,,no,,,,," in rows
    assert (
        "abc12300000000000000000000000000,farm@example.com,Farm,gate,,no,,,,," in rows
        and len(rows) == 4
    )
    bad = _run(blynkota_command, "devices", "list", cwd=tmp_path,
               env={"PATH": "/usr/bin:/bin", "BLYNKOTA_LOG_LEVEL": "LOUD"})  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().endswith("log.level: 'LOUD' is not one of DEBUG, INFO, WARNING, "
                                       "ERROR, CRITICAL")  # fmt: skip


def test_serve_upload_and_watch_a_rollout(blynkota_command, tmp_path):
    """The server from the command, and the admin API's client against it, as an operator
    on that machine uses them: the configuration gives the URL, the account and the CA."""
    config = tmp_path / "server.properties"
    config.write_text(
        "http.port=0\nhttps.port=0\nlisten.address=127.0.0.1\ndata.folder=fleet\n"
        "admin.pass=s3cret-pass\nota.sweep.interval=0.2\nnode.poll.interval=0.1\n"
        "ota.health.window=1\n"
    )
    token = _run(blynkota_command, "--config", str(config), "devices", "add", "--user",
                 "farm@example.com", "--project", "Farm", cwd=tmp_path).stdout.strip()  # fmt: skip
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [str(blynkota_command), "--config", str(config), "serve"],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    device = None
    try:
        ports = wait_for_ports(server, log_path)
        # The CLI finds the port in the configuration: written here once the kernel chose it.
        admin_port = ports["the admin API"]
        config.write_text(config.read_text().replace("https.port=0", f"https.port={admin_port}"))
        device = subprocess.Popen(
            [sys.executable, "-m", "blynkota.simulator", "--port", str(ports["devices"]),
             "--token", token, "--build", OLD, "--duration", "60", "--updates", "1"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        image = tmp_path / "firmware.bin"
        image.write_bytes(esp8266_image(NEW, size=50_000))
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        dry = _run(blynkota_command, "--config", str(config), "firmware", "upload", str(image),
                   "--user", "farm@example.com", "--dry-run", cwd=elsewhere)  # fmt: skip
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.startswith(f"Dry run: build {NEW} (esp8266),")
        assert "Uploading firmware.bin" in dry.stderr  # the progress bar
        started = _run(blynkota_command, "--config", str(config), "firmware", "upload",
                       str(image), "--user", "farm@example.com", "--now",
                       cwd=elsewhere)  # fmt: skip
        assert started.returncode == 0, started.stderr
        assert re.match(rf"Rollout 1 started: 1 device\(s\), build {NEW}, file /static/ota/",
                        started.stdout)  # fmt: skip
        watched = _run(blynkota_command, "--config", str(config), "rollout", "status", "1",
                       "--watch", "--interval", "0.5", "--timeout", "60",
                       cwd=elsewhere)  # fmt: skip
        assert watched.returncode == 0, watched.stderr
        lines = watched.stdout.strip().splitlines()
        bar = [line for line in lines if line.startswith("[")][-1]
        assert bar.startswith(
            "[" + "#" * 40 + "] 100%  updated 1  verifying 0  in flight 0  pending 0"
        )
        # (then "complete: 1 device(s): ..." once the sweep has marked it)
        assert lines[-1] == "reach: 1 targeted, 1 seen since the start"
        paused = _run(blynkota_command, "--config", str(config), "rollout", "pause", "1",
                      cwd=elsewhere)  # fmt: skip
        assert "rollout 1  paused" in paused.stdout and "paused: by admin@blynk.cc" in paused.stdout
        wrong = _run(blynkota_command, "--config", str(config), "rollout", "resume", "1",
                     "--password", "wrong", cwd=elsewhere)  # fmt: skip
        assert (wrong.returncode, wrong.stderr) == (1, "Error: 403: Authentication failed.\n")
    finally:
        if device is not None:
            device.terminate()
            device.wait(10)
        server.send_signal(signal.SIGTERM)
        assert server.wait(20) == 0
    assert "Traceback" not in log_path.read_text()
