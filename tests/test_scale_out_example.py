"""README's "Scaling out" example, run: two device processes and gunicorn behind HAProxy.

The processes are started with the README's commands and read
config/scale-out.properties; HAProxy reads config/haproxy.cfg. Only the ports
(free ones instead of 8080/8081/8082/8000/9443), the database and the folder
differ, so the example cannot rot.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
import sqlalchemy

from blynkota.simulator import SimulatedDevice
from blynkota.store import upgrade

from .devices import BUILD_NEW, BUILD_OLD
from .images import esp8266_image
from .servers import ROOT, wait_until
from .test_process_types import free_port, request, run, stop, wait_for_port

pytestmark = [pytest.mark.mysql, pytest.mark.multinode]

CONFIG = ROOT / "config"


@pytest.fixture
def haproxy():
    found = shutil.which("haproxy")
    if found is None:
        reason = "haproxy is not installed (Debian package haproxy; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def test_the_readme_scale_out_example_updates_a_device_through_haproxy(
    haproxy, mysql_url, tmp_path
):
    readme = (ROOT / "README.md").read_text()
    for command in (
        "BLYNKOTA_HTTP_PORT=8081 python wsgi.py devices &",
        "gunicorn -k gevent -b 127.0.0.1:8000 wsgi:app &",
        "haproxy -f config/haproxy.cfg",
    ):
        assert command in readme
    ports = {port: free_port() for port in (8080, 8081, 8082, 8000, 9443)}
    properties = (CONFIG / "scale-out.properties").read_text()
    properties = re.sub(r"(?m)^db\.url=.*$", f"db.url={mysql_url}", properties)
    properties = properties.replace("server.http.port=8080", f"server.http.port={ports[8080]}")
    properties += f"data.folder={tmp_path / 'data'}\nnode.heartbeat.interval=0.5\n"
    (tmp_path / "scale-out.properties").write_text(properties)
    haproxy_cfg = (CONFIG / "haproxy.cfg").read_text()
    for old, new in ports.items():
        haproxy_cfg = re.sub(rf"(?<![0-9]){old}(?![0-9])", str(new), haproxy_cfg)
    pem = tmp_path / "admin.pem"
    haproxy_cfg = haproxy_cfg.replace("data/tls/admin.pem", str(pem))
    (tmp_path / "haproxy.cfg").write_text(haproxy_cfg)
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
         "-days", "1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    pem.write_bytes(cert.read_bytes() + key.read_bytes())

    upgrade(mysql_url)  # alembic upgrade head
    env = {"BLYNKOTA_CONFIG": str(tmp_path / "scale-out.properties")}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    processes = [
        run(
            [sys.executable, "wsgi.py", "devices"],
            {**env, "BLYNKOTA_HTTP_PORT": str(port)},
            **quiet,
        )  # fmt: skip
        for port in (ports[8081], ports[8082])
    ]
    processes.append(
        run(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-k",
                "gevent",
                "-b",
                f"127.0.0.1:{ports[8000]}",
                "wsgi:app",
            ],
            env,
            **quiet,
        )  # fmt: skip
    )
    balancer = subprocess.Popen(
        [haproxy, "-f", str(tmp_path / "haproxy.cfg")], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    device = None
    try:
        for port in (ports[8081], ports[8082], ports[8000]):
            wait_for_port(port, processes[0])
        wait_for_port(ports[9443], balancer)
        engine = sqlalchemy.create_engine(mysql_url)
        from blynkota import create_app

        app = create_app({"db.url": mysql_url, "data.folder": tmp_path / "cli"})
        token = app.extensions["blynkota.fleet"].add_device("me@example.com", "Farm")
        device = SimulatedDevice("127.0.0.1", ports[8080], token, BUILD_OLD)
        device.start()
        wait_until(device.ready.is_set, timeout=20, message="the device through HAProxy")

        answer = subprocess.run(
            ["curl", "-sS", "-w", "\n%{http_code}", "-F", f"file=@{_firmware(tmp_path)}",
             "--insecure", "-u", "admin@blynk.cc:admin",
             f"https://localhost:{ports[9443]}/admin/ota/start?token={token}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        body, _, status = answer.stdout.rpartition("\n")
        assert status == "200" and body.startswith("/static/ota/"), answer
        wait_until(lambda: device.build == BUILD_NEW, timeout=20, message="the update")
        assert device.ota_urls[0].startswith(f"http://127.0.0.1:{ports[8080]}/static/ota/")
        assert device.downloads[0].ok
        status, _, _ = request(ports[8000], "GET", "/admin/devices", {})
        assert status == 403  # gunicorn itself is plain HTTP: admin only through HAProxy
        with engine.connect() as connection:
            nodes = connection.execute(
                sqlalchemy.text("SELECT count(*) FROM nodes WHERE stopped_at IS NULL")
            ).scalar_one()
        assert nodes == 2
        app.extensions["blynkota.db"].dispose()
        engine.dispose()
    finally:
        if device is not None:
            device.stop()
        balancer.terminate()
        balancer.wait(10)
        for process in processes:
            stop(process)


def _firmware(folder):
    path = folder / "fw.bin"
    path.write_bytes(esp8266_image(BUILD_NEW))
    return path
