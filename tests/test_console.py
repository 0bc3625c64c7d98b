"""The `blynkota` command against a running server, as an operator types it:
a start with no target reaches every device, so it is asked for first."""

import os
import pty
import subprocess
import sys

from .devices import BUILD_NEW
from .images import esp8266_image
from .servers import ADMIN_EMAIL, ADMIN_PASS, ROOT, clean_env


def upload(server, image, *options: str, terminal: bytes | None = None):
    """`blynkota firmware upload` in a child process; with `terminal`, its stdin
    is a terminal (a pty) that types those bytes."""
    command = [
        sys.executable, "-c", "from blynkota.console import main; main()",
        "firmware", "upload", str(image), *options,
        "--url", f"https://127.0.0.1:{server.https_port}",
        "--admin", ADMIN_EMAIL, "--password", ADMIN_PASS, "--insecure",
    ]  # fmt: skip
    stdin, typed = subprocess.DEVNULL, None
    if terminal is not None:
        typed, stdin = pty.openpty()
    process = subprocess.Popen(command, cwd=ROOT, env=clean_env(), stdin=stdin,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    if typed is not None:
        os.close(stdin)
        os.write(typed, terminal)
    try:
        out, err = process.communicate(timeout=60)
    finally:
        if typed is not None:
            os.close(typed)
    return process.returncode, out.decode(), err.decode()


def test_a_start_for_every_device_is_confirmed_first(server, fleet, tmp_path):
    for _ in range(2):
        fleet.add_device("me@example.com", "Farm")
    image = tmp_path / "fw.bin"
    image.write_bytes(esp8266_image(BUILD_NEW))

    # No terminal to ask on, no --yes: refused in one line, nothing started.
    code, out, err = upload(server, image)
    assert code == 2 and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("Error: with no --token, --user or --project this starts a rollout")
    assert "add --yes" in last
    assert server.admin("GET", "/admin/ota/status").json() == []

    # Asked on a terminal, after a dry run; "n" starts nothing.
    code, out, err = upload(server, image, terminal=b"n\n")
    assert code == 1 and "Aborted!" in err
    assert "device(s) would be taken in now. Start it for every device? [y/N]" in err
    assert server.admin("GET", "/admin/ota/status").json() == []

    # --yes, as a script says it.
    code, out, err = upload(server, image, "--yes")
    assert code == 0, err
    assert out.startswith("Rollout 1 started: 2 device(s), build ")
    (rollout,) = server.admin("GET", "/admin/ota/status").json()
    assert rollout["scope"] == "all"
