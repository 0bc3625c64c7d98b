"""Webhooks: rollout events POSTed, signed, to a real HTTP receiver (issue 29).

The receiver is a gevent WSGI server on 127.0.0.1 in the test process; the
first request it gets is answered 500, so the outbox's retry is seen too.
"""

import hashlib
import hmac
import json
import socket

import pytest
from gevent.pywsgi import WSGIServer

from blynkota.ota.notifications import event_kind

from .devices import BUILD_NEW
from .images import esp8266_image
from .servers import wait_until

SECRET = "webhook-s3cret"


class Receiver:
    """Records every POST; answers 500 to the first, 200 to the rest."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict, bytes]] = []
        self.server = WSGIServer(("127.0.0.1", 0), self.app, log=None, error_log=None)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/blynkota"

    def app(self, environ, start_response):
        body = environ["wsgi.input"].read()
        headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items()
                   if k.startswith("HTTP_")}  # fmt: skip
        headers["Content-Type"] = environ.get("CONTENT_TYPE")
        self.requests.append((headers, body))
        status = "500 Internal Server Error" if len(self.requests) == 1 else "200 OK"
        start_response(status, [("Content-Type", "text/plain")])
        return [b"ok"]


@pytest.fixture
def receiver():
    running = Receiver()
    yield running
    running.server.stop()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_every_rollout_event_reaches_the_receiver_signed_at_least_once(server_factory, receiver):
    refused = f"http://127.0.0.1:{_closed_port()}/nobody-listens"
    server = server_factory(**{
        "notify.webhook.urls": f"{receiver.url},{refused}",
        "notify.webhook.secret": SECRET,
        "notify.webhook.backoff": 0.3,
    })  # fmt: skip
    answer = server.upload("/admin/ota/start?user=me@example.com", esp8266_image(BUILD_NEW))
    assert answer.status == 400  # no such user: nothing started, nothing sent
    assert server.upload("/admin/ota/start", esp8266_image(BUILD_NEW)).status == 200
    (rollout,) = server.admin("GET", "/admin/ota/status").json()
    for action in ("pause", "resume"):
        assert server.admin("POST", f"/admin/ota/rollouts/{rollout['id']}/{action}").status == 200
    assert server.admin("GET", f"/admin/ota/stop?rollout={rollout['id']}").status == 200
    wanted = ["started", "paused", "resumed", "stopped"]
    wait_until(lambda: _delivered(receiver) == wanted, timeout=30, message="every event")
    # The first was answered 500 and sent again: at least once, the same delivery.
    first = receiver.requests[0]
    again = [request for request in receiver.requests[1:]
             if request[0]["X-Blynkota-Delivery"] == first[0]["X-Blynkota-Delivery"]]  # fmt: skip
    assert [body for _, body in again] == [first[1]]
    for headers, body in receiver.requests:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Blynkota-Signature"] == expected
        assert headers["Content-Type"] == "application/json"
    paused = next(json.loads(body) for _, body in receiver.requests
                  if json.loads(body)["event"] == "paused")  # fmt: skip
    assert paused["rollout"]["id"] == rollout["id"] and paused["to"] == "paused"
    assert paused["detail"] == "paused: by admin@blynk.cc"
    assert paused["firmware"]["build"] == BUILD_NEW
    report = {hook["url"]: hook for hook in server.admin("GET", "/admin/webhooks").json()}
    good, bad = report[receiver.url], report[refused]
    assert (good["delivered"], good["pending"], good["last_status"]) == (4, 0, 200)
    assert bad["delivered"] == 0 and bad["pending"] == 4 and bad["last_status"] is None
    assert "refused" in bad["last_error"].lower()
    page = server.admin("GET", "/admin/fleet").text  # the dashboard's fleet page
    assert f"<code>http://127.0.0.1:{receiver.server.server_port}/…</code>" in page
    # The URL's path may hold a secret: the log shows scheme, host and port only.
    log = server.log()
    assert "nobody-listens" not in log and "/hooks/blynkota" not in log and SECRET not in log


def _delivered(receiver: Receiver) -> list[str]:
    """The events answered 2xx (every request but the first), in the order of
    their deliveries (the events' order), each once."""
    answered = {
        int(headers["X-Blynkota-Delivery"]): json.loads(body)["event"]
        for headers, body in receiver.requests[1:]
    }
    return [event for _, event in sorted(answered.items())]


def test_event_kinds():
    assert event_kind(None, "active", "started by a") == "started"
    assert event_kind(None, "scheduled", "scheduled for …") == "scheduled"
    assert event_kind("scheduled", "active", "started as scheduled") == "started"
    assert event_kind("active", "active", "wave reached 100%: 10% -> 50% of devices") == (
        "wave_opened"
    )
    assert event_kind("active", "paused", "paused: failure ratio …") == "paused"
    assert event_kind("paused", "active", "resumed by a") == "resumed"
    assert event_kind("active", "complete", "complete: 3 device(s): …") == "complete"
    assert event_kind("complete", "active", "active again") == "reopened"
    assert event_kind("active", "superseded", "superseded by a") == "superseded"
