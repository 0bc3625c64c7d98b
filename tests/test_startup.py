"""Starting the server as operators do: a fresh folder, Blynk's flags, the CLI, alembic, honcho."""

import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy
from alembic.script import ScriptDirectory

from blynkota.store import alembic_config
from blynkota.tls import ensure_certificate

from .servers import ROOT, ServerProcess, clean_env, wait_for_ports, write_properties

HEAD = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
LISTENING = re.compile(r"listening for (devices|the admin API).* on [^:]+:(\d+)")


def test_fresh_start_with_nothing_configured(tmp_path):
    data = tmp_path / "data"
    log_path = tmp_path / "server.log"
    # Only the ports and address differ from a bare `python wsgi.py`, so tests can run in parallel.
    env = clean_env(
        BLYNKOTA_HTTP_PORT=0, BLYNKOTA_HTTPS_PORT=0, BLYNKOTA_LISTEN_ADDRESS="127.0.0.1"
    )
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "wsgi.py", "-dataFolder", str(data)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_ports(process, log_path)
        text = log_path.read_text()
        assert len(LISTENING.findall(text)) == 2  # one line per listener
        assert "default password" in text
        with sqlite3.connect(data / "blynkota.db") as database:
            (version,) = database.execute("SELECT version_num FROM alembic_version").fetchone()
            tables = {row[0] for row in database.execute("SELECT name FROM sqlite_master")}
        assert version == HEAD and {"devices", "rollouts", "ota_commands"} <= tables
        assert (data / "tls" / "cert.pem").is_file()
        assert stat.S_IMODE((data / "tls" / "key.pem").stat().st_mode) == 0o600
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    assert "stopped" in log_path.read_text()
    assert "Traceback" not in log_path.read_text()


def test_a_restart_keeps_the_certificate_and_the_database(tmp_path):
    server = ServerProcess(tmp_path, f"sqlite:///{tmp_path / 'data' / 'blynkota.db'}").start()
    certificate = (server.data_folder / "tls" / "cert.pem").read_bytes()
    server.stop()
    server.start()
    assert (server.data_folder / "tls" / "cert.pem").read_bytes() == certificate
    assert server.admin("GET", "/admin/devices").status == 200
    assert server.stop() == 0


def test_bad_configuration_is_one_clear_line(tmp_path):
    config = write_properties(tmp_path / "bad.properties", {"http.port": "eighty"})
    result = subprocess.run(
        [sys.executable, "wsgi.py", "-serverConfig", str(config)],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == "blynkota: http.port: 'eighty' is not a whole number\n"


def test_blynkota_config_reaches_the_flask_cli_and_alembic(tmp_path):
    database = tmp_path / "shared.db"
    config = write_properties(
        tmp_path / "server.properties",
        {"db.url": f"sqlite:///{database}", "data.folder": tmp_path / "data"},
    )
    env = clean_env(BLYNKOTA_CONFIG=config)
    migrated = subprocess.run(
        ["alembic", "upgrade", "head"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert migrated.returncode == 0, migrated.stderr
    added = subprocess.run(
        ["flask", "--app", "wsgi", "devices", "add", "--user", "a@b.c", "--project", "P"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT token FROM devices").fetchall() == [(token,)]
    current = subprocess.run(
        ["alembic", "current"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert f"{HEAD} (head)" in current.stdout


@pytest.mark.skipif(
    subprocess.run(["which", "honcho"], capture_output=True).returncode != 0,
    reason="honcho is not installed (pip install -r requirements.txt)",
)
def test_honcho_start_runs_the_procfile(tmp_path):
    config = write_properties(
        tmp_path / "server.properties",
        {
            "http.port": 0,
            "https.port": 0,
            "listen.address": "127.0.0.1",
            "data.folder": tmp_path / "data",
        },
    )
    log_path = tmp_path / "honcho.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["honcho", "start"], cwd=ROOT, env=clean_env(BLYNKOTA_CONFIG=config),
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_ports(process, log_path)
        assert (tmp_path / "data" / "blynkota.db").is_file()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)
    assert "Traceback" not in log_path.read_text()


@pytest.mark.parametrize(
    "case, message",
    [
        ("garbage", "are not a PEM certificate and its key"),
        ("mismatched", "is not the key of the certificate"),
        ("cert without key", "server.ssl.key: "),
        ("missing cert", "does not exist"),
    ],
)
def test_broken_tls_files_stop_the_start_in_one_line(tmp_path, case, message):
    first, second = tmp_path / "first", tmp_path / "second"
    ensure_certificate(first / "cert.pem", first / "key.pem")
    ensure_certificate(second / "cert.pem", second / "key.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    files = {
        "garbage": {"server.ssl.cert": garbage, "server.ssl.key": garbage},
        "mismatched": {"server.ssl.cert": first / "cert.pem", "server.ssl.key": second / "key.pem"},
        "cert without key": {"server.ssl.cert": first / "cert.pem"},
        "missing cert": {"server.ssl.cert": tmp_path / "nope.pem", "server.ssl.key": garbage},
    }[case]
    config = write_properties(
        tmp_path / "tls.properties",
        {"data.folder": tmp_path / "data", "http.port": 0, "https.port": 0, **files},
    )
    result = subprocess.run(
        [sys.executable, "wsgi.py", "-serverConfig", str(config)],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("blynkota: ") and message in last, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "listening" not in result.stderr + result.stdout
    assert not (tmp_path / "data" / "tls").exists()  # nothing generated beside a given pair


@pytest.mark.parametrize("port_key", ["http.port", "https.port"])
def test_a_port_in_use_is_one_line_and_exit_2(tmp_path, port_key):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    config = write_properties(
        tmp_path / "server.properties",
        {
            "http.port": 0,
            "https.port": 0,
            "listen.address": "127.0.0.1",
            "data.folder": tmp_path / "data",
            port_key: port,
        },
    )
    try:
        result = subprocess.run(
            [sys.executable, "wsgi.py", "-serverConfig", str(config)],
            cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        taken.close()
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"blynkota: {port_key}: 127.0.0.1:{port} is in use by another process"
    assert "Traceback" not in result.stderr


def test_sigterm_stops_at_once_whatever_the_clocks_intervals(tmp_path):
    """The heartbeat and the sweeper sleep between ticks; a stop wakes them,
    rather than waiting out their interval (or the shutdown grace)."""
    server = ServerProcess(
        tmp_path,
        f"sqlite:///{tmp_path / 'blynkota.db'}",
        **{"node.heartbeat.interval": 30, "ota.sweep.interval": 30, "shutdown.grace.seconds": 20},
    ).start()
    # Killed (-9) if still running after 10 s: the clocks would have held it 21 s.
    assert server.stop(timeout=10) == 0
    assert "stopped" in server.log()


def test_a_typo_in_a_key_is_named_at_start(tmp_path):
    config = tmp_path / "server.properties"
    config.write_text(
        f"htpp.port=8081\nhttp.port 0\nhttps.port:0\nlisten.address=127.0.0.1\n"
        f"data.folder={tmp_path / 'data'}\n"
    )
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "wsgi.py", "-serverConfig", str(config)],
            cwd=ROOT, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        ports = wait_for_ports(process, log_path)
        assert ports["devices"] != 8081  # `http.port 0` (a space) was read; the typo was not
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(15)
    assert "unknown key 'htpp.port' ignored (did you mean http.port?)" in log_path.read_text()


def test_the_flask_cli_from_another_folder_uses_the_configured_fleet(tmp_path):
    """A relative data.folder is the config file's, not the working directory's; and
    flask, with python-dotenv installed, prints no tip about it."""
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "server.properties").write_text("data.folder=fleet\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = clean_env(BLYNKOTA_CONFIG=folder / "server.properties")
    added = subprocess.run(
        ["flask", "--app", str(ROOT / "wsgi.py"), "devices", "add", "--user", "a@b.c",
         "--project", "P"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    with sqlite3.connect(folder / "fleet" / "blynkota.db") as connection:
        assert connection.execute("SELECT token FROM devices").fetchall() == [
            (added.stdout.strip(),)
        ]
    assert not (elsewhere / "data").exists()
    assert "dotenv" not in added.stderr


def test_a_bad_setting_is_one_line_for_the_flask_cli_too(tmp_path):
    result = subprocess.run(
        ["flask", "--app", "wsgi", "devices", "list"],
        cwd=ROOT, env=clean_env(BLYNKOTA_LOG_LEVEL="LOUD"), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        "Error: log.level: 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL\n"
    )


def _listen_backlog(port: int) -> int:
    """The backlog the kernel gives the listening socket on `port` (`ss`: Send-Q)."""
    answer = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True
    )
    (line,) = answer.stdout.splitlines()
    return int(line.split()[2])


def test_the_device_port_listens_with_the_configured_backlog_and_warns_past_somaxconn(tmp_path):
    """A reconnect storm waits in the listen backlog (hardware.listen.backlog);
    a kernel that caps it lower (net.core.somaxconn) is named at start."""
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    warning = "net.core.somaxconn is %d, below hardware.listen.backlog %d"
    for name, backlog in (("small", 77), ("past-the-cap", somaxconn + 1)):
        folder = tmp_path / name
        folder.mkdir()
        server = ServerProcess(
            folder, f"sqlite:///{folder / 'blynkota.db'}", **{"hardware.listen.backlog": backlog}
        ).start()
        try:
            assert _listen_backlog(server.http_port) == min(backlog, somaxconn)
            warned = warning % (somaxconn, backlog) in server.log()
            assert warned == (backlog > somaxconn)
        finally:
            server.stop()


@pytest.mark.mysql
@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "wsgi.py"],
        ["flask", "--app", "wsgi", "devices", "list"],
        [sys.executable, "-c", "from blynkota.console import main; main()", "devices", "list"],
        ["alembic", "upgrade", "head"],
    ],
    ids=["server", "flask", "blynkota", "alembic"],
)
def test_a_database_refusing_the_login_is_one_line_and_exit_2(mysql_url, tmp_path, command):
    """A wrong password: one line naming the database, its host and the cause, never
    the password and no traceback, from the server and every command on the database."""
    server = sqlalchemy.engine.make_url(mysql_url)  # skipped without MariaDB
    url = server.set(username="blynkota_nobody", password="wrong-Pa55")
    config = write_properties(
        tmp_path / "server.properties",
        {"db.url": url.render_as_string(hide_password=False), "data.folder": tmp_path / "data",
         "http.port": 0, "https.port": 0},
    )  # fmt: skip
    result = subprocess.run(
        command, cwd=ROOT, env=clean_env(BLYNKOTA_CONFIG=config), capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    where = f"cannot use the database {server.database!r} on {server.host}:{server.port or 3306}: "
    assert where in last and "blynkota_nobody" in last and last.endswith("(db.url)")
    assert "Traceback" not in result.stderr and "wrong-Pa55" not in result.stderr
