"""Webhooks: every rollout event a person should hear of, POSTed as signed JSON.

The outbox is the database. Rollout-level events are rows of `rollout_events`
already (written in the transaction that changed the rollout: started,
scheduled, a wave opened, paused with its reason, resumed, complete with its
outcome, stopped, superseded). The node holding the sweeper lease, whichever
is alive, turns each event since an endpoint was configured into a delivery
row per endpoint (unique per event and endpoint, so two nodes never make two)
and sends the pending ones: marked delivered only on a 2xx answer, so a node
that dies mid-send leaves it pending for the next (at least once; receivers
dedupe by `X-Blynkota-Delivery`). A failed send is retried after
notify.webhook.backoff seconds, doubling up to an hour, until the event is a
day old; then abandoned. Sending runs in its own greenlet with a timeout:
never in a device's or an admin request's way.

The body's HMAC-SHA256 under notify.webhook.secret is in
`X-Blynkota-Signature: sha256=<hex>`.
"""

import hashlib
import hmac
import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import gevent
from sqlalchemy import and_, exists, func, insert, select, update
from sqlalchemy.orm import Session

from ..store import (
    Database,
    Firmware,
    Rollout,
    RolloutEvent,
    WebhookDelivery,
    WebhookEndpoint,
    utcnow,
)
from .firmware.catalog import iso

__all__ = ["WebhookNotifier", "delivery_report", "event_kind", "sign", "where"]

log = logging.getLogger(__name__)

SEND_TIMEOUT = 10.0  # seconds a receiver has to answer
GIVE_UP_AFTER = timedelta(hours=24)
LONGEST_BACKOFF = 3600.0
BATCH = 100  # deliveries made, or sent, per tick


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: `sha256=` and the body's HMAC-SHA256 in hex."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def where(url: str) -> str:
    """A URL as logs show it: scheme, host and port; its path may hold a secret."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/…"


def event_kind(before: str | None, after: str, detail: str | None) -> str:
    """What a rollout event is, in one word for the receiver."""
    if before is None:
        return "scheduled" if after == "scheduled" else "started"
    if before == after:
        return "wave_opened" if "% of devices" in (detail or "") else after
    return {
        ("scheduled", "active"): "started",
        ("paused", "active"): "resumed",
        ("complete", "active"): "reopened",
    }.get((before, after), after)


@dataclass(frozen=True)
class _Pending:
    delivery_id: int
    attempts: int
    url: str
    event_at: datetime
    body: bytes
    kind: str


class WebhookNotifier:
    def __init__(self, db: Database, urls: tuple[str, ...], secret: str, backoff: float) -> None:
        self.db, self.urls, self.secret, self.backoff = db, urls, secret, backoff
        self._running: gevent.Greenlet | None = None

    def kick(self) -> None:
        """Make and send what is due, in a greenlet of its own (one at a time)."""
        if self.urls and (self._running is None or self._running.dead):
            self._running = gevent.spawn(self._tick)

    def _tick(self) -> None:
        try:
            self.db.run(lambda session: self._make_deliveries(session, utcnow()))
            for pending in self.db.run(lambda session: _due(session, utcnow())):
                self._send(pending)
        except Exception as error:  # the database away, say: the next tick tries again
            log.warning("webhooks: %s: %s", type(error).__name__, error)

    def _make_deliveries(self, session: Session, now: datetime) -> int:
        """A delivery row per endpoint for each rollout event since it was configured."""
        made = 0
        for url in self.urls:
            endpoint = session.scalar(select(WebhookEndpoint).where(WebhookEndpoint.url == url))
            if endpoint is None:  # first seen: its events start now
                endpoint = WebhookEndpoint(url=url, since=now)
                session.add(endpoint)
                session.flush()  # two nodes at once: a duplicate key, the unit runs again
            done = exists().where(
                WebhookDelivery.event_id == RolloutEvent.id,
                WebhookDelivery.endpoint_id == endpoint.id,
            )
            events = session.scalars(
                select(RolloutEvent.id)
                .where(
                    RolloutEvent.device_id.is_(None),
                    # A second's slack: MySQL rounds the events' times to the second.
                    RolloutEvent.at >= endpoint.since - timedelta(seconds=1),
                    RolloutEvent.at >= now - GIVE_UP_AFTER,
                    ~done,
                )
                .order_by(RolloutEvent.id)
                .limit(BATCH)
            ).all()
            if events:
                session.execute(
                    insert(WebhookDelivery),
                    [
                        {"event_id": event_id, "endpoint_id": endpoint.id, "state": "pending",
                         "attempts": 0, "next_attempt_at": now, "created_at": now}
                        for event_id in events
                    ],
                )  # fmt: skip
                made += len(events)
        return made

    def _send(self, pending: _Pending) -> None:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "blynkota-webhook",
            "X-Blynkota-Event": pending.kind,
            "X-Blynkota-Delivery": str(pending.delivery_id),
        }
        if self.secret:
            headers["X-Blynkota-Signature"] = sign(self.secret, pending.body)
        request = urllib.request.Request(pending.url, pending.body, headers, method="POST")
        status, error = None, None
        try:
            with urllib.request.urlopen(request, timeout=SEND_TIMEOUT) as answer:
                status = answer.status
        except urllib.error.HTTPError as refused:
            status, error = refused.code, f"answered {refused.code}"
        except (OSError, ValueError) as failure:  # refused, unreachable, timed out
            error = str(failure)[:200] or type(failure).__name__
        self.db.run(lambda session: self._record(session, pending, status, error, utcnow()))

    def _record(self, session, pending: _Pending, status, error, now: datetime) -> None:
        delivered = error is None and status is not None and 200 <= status < 300
        values: dict = {"attempts": pending.attempts + 1, "last_status": status}
        if delivered:
            values |= {"state": WebhookDelivery.DELIVERED, "delivered_at": now, "last_error": None}
        else:
            wait = min(self.backoff * 2**pending.attempts, LONGEST_BACKOFF)
            retry_at = now + timedelta(seconds=wait)
            gone = retry_at > pending.event_at + GIVE_UP_AFTER
            values |= {
                "state": WebhookDelivery.ABANDONED if gone else WebhookDelivery.PENDING,
                "next_attempt_at": retry_at,
                "last_error": (error or f"answered {status}")[:255],
            }
            log.info("webhook %d to %s: %s%s", pending.delivery_id, where(pending.url),
                     values["last_error"], "; abandoned" if gone else "")  # fmt: skip
        session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == pending.delivery_id,
                WebhookDelivery.state == WebhookDelivery.PENDING,
                WebhookDelivery.attempts == pending.attempts,
            )
            .values(**values)
        )


def _due(session: Session, now: datetime) -> list[_Pending]:
    """Pending deliveries whose time has come, oldest first, with their bodies:
    the event alone, so that a delivery sent again is the same bytes."""
    rows = session.execute(
        select(
            WebhookDelivery.id,
            WebhookDelivery.attempts,
            WebhookEndpoint.url,
            RolloutEvent,
            Rollout.scope,
            Firmware.name,
            Firmware.build,
            Firmware.fw_version,
        )
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .join(RolloutEvent, RolloutEvent.id == WebhookDelivery.event_id)
        .join(Rollout, Rollout.id == RolloutEvent.rollout_id)
        .join(Firmware, Firmware.id == Rollout.firmware_id)
        .where(
            WebhookDelivery.state == WebhookDelivery.PENDING,
            WebhookDelivery.next_attempt_at <= now,
        )
        .order_by(WebhookDelivery.id)
        .limit(BATCH)
    ).all()
    due = []
    for delivery_id, attempts, url, event, scope, name, build, version in rows:
        kind = event_kind(event.from_state, event.to_state, event.detail)
        body = {
            "delivery": delivery_id,
            "event": kind,
            "at": iso(event.at),
            "rollout": {"id": event.rollout_id, "scope": scope},
            "from": event.from_state,
            "to": event.to_state,
            "detail": event.detail,
            "firmware": {"name": name, "build": build, "fw_version": version},
        }
        data = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        due.append(_Pending(delivery_id, attempts, url, event.at, data, kind))
    return due


def delivery_report(session: Session) -> list[dict]:
    """Per endpoint: its deliveries by state, and the latest attempt's outcome."""
    report = []
    for endpoint in session.scalars(select(WebhookEndpoint).order_by(WebhookEndpoint.id)):
        counts = dict(
            session.execute(
                select(WebhookDelivery.state, func.count())
                .where(WebhookDelivery.endpoint_id == endpoint.id)
                .group_by(WebhookDelivery.state)
            ).all()
        )
        latest = session.execute(
            select(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == endpoint.id, WebhookDelivery.attempts > 0)
            .order_by(
                func.coalesce(WebhookDelivery.delivered_at, WebhookDelivery.next_attempt_at).desc()
            )
            .limit(1)
        ).scalar()
        report.append(
            {
                "url": endpoint.url,
                "since": iso(endpoint.since),
                "pending": counts.get(WebhookDelivery.PENDING, 0),
                "delivered": counts.get(WebhookDelivery.DELIVERED, 0),
                "abandoned": counts.get(WebhookDelivery.ABANDONED, 0),
                "last_status": latest.last_status if latest else None,
                "last_error": latest.last_error if latest else None,
                "last_delivered_at": iso(
                    session.scalar(
                        select(func.max(WebhookDelivery.delivered_at)).where(
                            and_(WebhookDelivery.endpoint_id == endpoint.id)
                        )
                    )
                ),
            }
        )
    return report
