"""The operators' records: the audit trail and the webhook outbox (models.py has the rest)."""

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from .models import Base, PreciseDateTime, utcnow

__all__ = ["AuditEntry", "WebhookDelivery", "WebhookEndpoint"]


class AuditEntry(Base):
    """Append-only: every state-changing request, by API, dashboard or command line."""

    __tablename__ = "audit_entries"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(PreciseDateTime, default=utcnow, index=True)
    admin: Mapped[str] = mapped_column(String(255))  # who; "-" if not signed in
    address: Mapped[str] = mapped_column(String(64))  # the client's, or "command line"
    action: Mapped[str] = mapped_column(String(64))  # e.g. "POST /admin/ota/start"
    rollout_id: Mapped[int | None]
    device: Mapped[str | None] = mapped_column(String(16))  # the token's tag, never the token
    firmware: Mapped[str | None] = mapped_column(String(64))  # its served name
    status: Mapped[int]  # the answer's HTTP status (0 for a command that failed)
    detail: Mapped[str | None] = mapped_column(String(255))


class WebhookEndpoint(Base):
    """A URL of notify.webhook.urls, from when it was first configured: the
    rollout events since then are sent to it (ota/notifications.py)."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(primary_key=True)
    url: Mapped[str] = mapped_column(String(255), unique=True)
    since: Mapped[datetime] = mapped_column(PreciseDateTime, default=utcnow)


class WebhookDelivery(Base):
    """The outbox: one rollout event to one endpoint, until it answered 2xx
    (delivered) or 24 hours passed (abandoned)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "endpoint_id"),
        Index("ix_webhook_deliveries_state_next_attempt_at", "state", "next_attempt_at"),
    )

    PENDING, DELIVERED, ABANDONED = "pending", "delivered", "abandoned"

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("rollout_events.id"))
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("webhook_endpoints.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(PreciseDateTime, default=utcnow)
    last_status: Mapped[int | None]  # the HTTP status of the latest attempt
    last_error: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(PreciseDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(PreciseDateTime)
