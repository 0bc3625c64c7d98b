"""Tables, named for the operators who read them with plain SQL.

All timestamps are UTC, stored without a zone (MySQL DATETIME has none).
Rows that tell history (firmware, rollouts, ota_commands) are never deleted:
a replaced or stopped rollout changes state and keeps its row.
"""

from datetime import UTC, datetime
from typing import Optional

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
    false,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "Base",
    "utcnow",
    "User",
    "Project",
    "Device",
    "DeviceTag",
    "Admin",
    "AdminRole",
    "Firmware",
    "FirmwareBlob",
    "FirmwareChunk",
    "CHUNK_BYTES",
    "Node",
    "Lock",
    "Rollout",
    "OtaCommand",
    "RolloutScope",
    "RolloutState",
    "DeviceState",
    "HealthOutcome",
    "RolloutDevice",
    "RolloutEvent",
]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# MySQL's DATETIME keeps whole seconds: a heartbeat stored that way looks up
# to a second older than it is. Times that decide between processes (leases,
# heartbeats, which login is newer) keep microseconds on every backend.
PreciseDateTime = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql")


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    projects: Mapped[list["Project"]] = relationship(back_populates="user")


class Project(Base):
    """A Blynk dashboard: `dash_id` is the id the Blynk app gave it."""

    __tablename__ = "projects"
    __table_args__ = (UniqueConstraint("user_id", "dash_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    dash_id: Mapped[int]
    name: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    user: Mapped[User] = relationship(back_populates="projects")
    devices: Mapped[list["Device"]] = relationship(back_populates="project")


class Device(Base):
    """A board and what it last reported in its info message."""

    __tablename__ = "devices"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    blynk_id: Mapped[Optional[int]]  # the device id inside its Blynk dashboard
    name: Mapped[str] = mapped_column(String(255), default="")
    token: Mapped[str] = mapped_column(String(64), unique=True)
    board_type: Mapped[Optional[str]] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # From the info message (SPEC §2, §7): the library's version (`ver`, or
    # `blynk` from 1.3), the firmware's (`fw`, or `mcu`/`ncp` from 1.3) and
    # its type (`fw-type`), build, dev, h-beat, buff-in, tmpl.
    lib_version: Mapped[Optional[str]] = mapped_column(String(32))
    fw_version: Mapped[Optional[str]] = mapped_column(String(64))
    fw_type: Mapped[Optional[str]] = mapped_column(String(64))
    build: Mapped[Optional[str]] = mapped_column(String(64))
    hardware: Mapped[Optional[str]] = mapped_column(String(64))
    heartbeat: Mapped[Optional[int]]
    buff_in: Mapped[Optional[int]]
    template_id: Mapped[Optional[str]] = mapped_column(String(64))
    last_seen_at: Mapped[Optional[datetime]]
    last_address: Mapped[Optional[str]] = mapped_column(String(64))
    # Presence: set while a connection is logged in on node `node_id`, whose
    # session `session_id` it is. A disconnect clears them only if the session
    # is still the device's (a newer login elsewhere has replaced it otherwise);
    # a node whose lease ran out has its devices cleared by any other node.
    # No foreign key on node_id: a login must not lock the node's row.
    # Microseconds on MySQL too: two logins within one second are told apart.
    online_since: Mapped[Optional[datetime]] = mapped_column(PreciseDateTime)
    node_id: Mapped[Optional[int]] = mapped_column(index=True)
    session_id: Mapped[Optional[int]] = mapped_column(BigInteger)

    project: Mapped[Project] = relationship(back_populates="devices")


class AdminRole:
    """What an admin account may do; each role may do what the ones before it may."""

    VIEWER = "viewer"  # read everything
    OPERATOR = "operator"  # also start, pause, resume, stop, retry, expand rollouts
    ADMIN = "admin"  # also delete devices and firmware; accounts (on the command line)
    ALL = (VIEWER, OPERATOR, ADMIN)


class DeviceTag(Base):
    """A device's membership of a group (`devices tag`): campaigns may aim at a tag."""

    __tablename__ = "device_tags"
    __table_args__ = (UniqueConstraint("device_id", "tag"), Index("ix_device_tags_tag", "tag"))

    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"), index=True)
    tag: Mapped[str] = mapped_column(String(24))  # lowercase: letters, digits, . _ -


class Admin(Base):
    __tablename__ = "admins"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(255), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default="admin", server_default="admin")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Firmware(Base):
    """An uploaded file, served as /static/ota/<name>.bin."""

    __tablename__ = "firmware"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    original_name: Mapped[str] = mapped_column(String(255))
    size: Mapped[int]
    md5: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64))
    build: Mapped[Optional[str]] = mapped_column(String(64))
    chip: Mapped[Optional[str]] = mapped_column(String(32))
    # What the image's own `blnkinf` block says (firmware/image.py): the
    # firmware's version and type, and the Blynk library it was built with.
    fw_version: Mapped[Optional[str]] = mapped_column(String(64))
    fw_type: Mapped[Optional[str]] = mapped_column(String(64))
    lib_version: Mapped[Optional[str]] = mapped_column(String(32))
    # The SHA-256 fingerprint of the public key whose signature the image
    # carries (ESP8266 signed OTA, ESP32 Secure Boot V2); NULL: unsigned.
    signed_by: Mapped[Optional[str]] = mapped_column(String(64))
    # The content's SHA-256 while the firmware is stored, NULL once deleted:
    # unique, so the same bytes uploaded twice, by any process, are one row.
    live_sha256: Mapped[Optional[str]] = mapped_column(String(64), unique=True, index=True)
    uploaded_by: Mapped[str] = mapped_column(String(255))
    uploaded_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Not a column: set by FirmwareCatalog.add on a stored firmware an upload
    # of the same bytes found (the answer names it as reused).
    reused = False
    # Deleted by an operator: no longer served, its bytes gone; the row stays
    # for the rollouts that name it in their history.
    deleted_at: Mapped[Optional[datetime]]


# Firmware bytes live in the database, so that every node can serve every
# file: one blob per distinct content (keyed by its SHA-256), in chunks that
# stay below MySQL's max_allowed_packet.
CHUNK_BYTES = 512 * 1024


class FirmwareBlob(Base):
    __tablename__ = "firmware_blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int]
    md5: Mapped[str] = mapped_column(String(32))
    chunk_count: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class FirmwareChunk(Base):
    __tablename__ = "firmware_chunks"

    sha256: Mapped[str] = mapped_column(ForeignKey("firmware_blobs.sha256"), primary_key=True)
    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary().with_variant(mysql.MEDIUMBLOB(), "mysql"))


class Node(Base):
    """A server process that holds device connections; alive while it heartbeats."""

    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(primary_key=True)
    # Stable across restarts of the same process slot (host:port[/worker]), so
    # a restarted node clears its own stale sessions at once.
    name: Mapped[str] = mapped_column(String(128), unique=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int]
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(PreciseDateTime, default=utcnow)
    # Set by the node on a clean stop, or by a peer when its lease ran out.
    stopped_at: Mapped[Optional[datetime]]
    # Counts the runs of this slot: an offer remembers the run that made it.
    runs: Mapped[int] = mapped_column(default=0, server_default="0")


class LoginLimit(Base):
    """Failed-password budget of one client address or one admin account.

    A fixed window: `failures` counts attempts since `window_start`; every
    change is a conditional UPDATE, so processes share one budget and no two
    of them both take its last attempt.
    """

    __tablename__ = "login_limits"

    key: Mapped[str] = mapped_column(String(191), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(PreciseDateTime)
    failures: Mapped[int]


class Lock(Base):
    """Named rows that serialise work across processes.

    `offer-slots` is locked (SELECT ... FOR UPDATE) by every offer, so the
    download-slot count it checks cannot change under it. `sweeper` is a
    lease: the node in `holder` runs the rollout sweep until `expires_at`.
    """

    __tablename__ = "locks"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[Optional[int]]
    expires_at: Mapped[Optional[datetime]] = mapped_column(PreciseDateTime)


class RolloutScope:
    DEVICE = "device"
    PROJECT = "project"
    USER = "user"
    ALL = "all"
    # Most specific first: a device takes the first scope that has an active rollout.
    BY_PRECEDENCE = (DEVICE, PROJECT, USER, ALL)


class RolloutState:
    ACTIVE = "active"
    PAUSED = "paused"  # by hand or by the failure threshold: no offers until resumed
    SUPERSEDED = "superseded"
    STOPPED = "stopped"
    # Every device it targets has an outcome; a campaign goes back to active
    # when a device joins its target (a new one, one seen for the first time).
    COMPLETE = "complete"
    # startAt= in the future: started by the sweep at that time; no say over
    # any device until then.
    SCHEDULED = "scheduled"
    # States in which a rollout still has a say over its devices.
    RUNNING = (ACTIVE, PAUSED, COMPLETE)
    # Not ended yet: `stop` applies.
    LIVE = (*RUNNING, SCHEDULED)


class Rollout(Base):
    """One `ota/start`: a firmware aimed at a device, a project, a user or everyone."""

    __tablename__ = "rollouts"
    __table_args__ = (Index("ix_rollouts_state_scope", "state", "scope"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    scope: Mapped[str] = mapped_column(String(16))
    user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))
    project_id: Mapped[Optional[int]] = mapped_column(ForeignKey("projects.id"))
    device_id: Mapped[Optional[int]] = mapped_column(ForeignKey("devices.id"))
    firmware_id: Mapped[int] = mapped_column(ForeignKey("firmware.id"))
    state: Mapped[str] = mapped_column(String(16), default=RolloutState.ACTIVE)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_by: Mapped[str] = mapped_column(String(255))
    stopped_at: Mapped[Optional[datetime]]
    stopped_by: Mapped[Optional[str]] = mapped_column(String(255))
    superseded_by_id: Mapped[Optional[int]] = mapped_column(ForeignKey("rollouts.id"))
    # Fleet controls (a plain Blynk-style rollout has none): offer connected
    # devices at once; the share of targeted devices taking part; the waves it
    # grows through and the success share each needs; the seed hashed with each
    # token to choose who takes part; why it paused.
    push_online: Mapped[bool] = mapped_column(default=False, server_default=false())
    # allowDowngrade=true: devices on a newer version (or build) are offered
    # the image; without it they are incompatible ("would downgrade").
    allow_downgrade: Mapped[bool] = mapped_column(default=False, server_default=false())
    percent: Mapped[int] = mapped_column(default=100, server_default="100")
    waves: Mapped[Optional[str]] = mapped_column(String(64))  # e.g. "10,50,100"
    success_percent: Mapped[Optional[int]]  # to grow to the next wave
    cohort_seed: Mapped[str] = mapped_column(String(16), default="", server_default="")
    pause_reason: Mapped[Optional[str]] = mapped_column(String(255))
    # Set when connected devices are to be entered (now=true start, expand, a
    # grown wave), cleared once they are: the request answers before the
    # work is done, and the sweeper finishes what a stopped process left.
    enrol_due_at: Mapped[Optional[datetime]] = mapped_column(PreciseDateTime)
    # This rollout's own limits (maxConcurrent=, attemptTimeout=, maxAttempts=,
    # abortRatio=, waveDelay=, healthWindow=); NULL: the server's setting.
    max_concurrent: Mapped[Optional[int]]
    attempt_timeout: Mapped[Optional[int]]  # seconds
    max_attempts: Mapped[Optional[int]]
    abort_ratio: Mapped[Optional[float]] = mapped_column(Float)
    wave_delay: Mapped[Optional[int]]  # seconds
    health_window: Mapped[Optional[int]]  # seconds (healthWindow=, 0: none)
    # tag=: only the devices of its scope carrying this tag (fleet/tags.py).
    tag: Mapped[Optional[str]] = mapped_column(String(24))
    # startAt=: when a scheduled rollout starts (ota/rollouts/schedule.py).
    start_at: Mapped[Optional[datetime]] = mapped_column(PreciseDateTime)
    # window=, tz=: offers only between these minutes of the day in that zone.
    window_start: Mapped[Optional[int]]
    window_end: Mapped[Optional[int]]
    window_tz: Mapped[Optional[str]] = mapped_column(String(64))
    # When the current wave opened: with wave_delay, the next one waits for it.
    wave_opened_at: Mapped[Optional[datetime]] = mapped_column(PreciseDateTime)
    # The failure threshold judges only devices that finished after this.
    resumed_at: Mapped[Optional[datetime]]
    # "<scope>:<target id>" while the rollout is running, NULL once it ended:
    # the unique index lets only one rollout run per scope and target, whatever
    # number of processes start one at the same moment.
    running_key: Mapped[Optional[str]] = mapped_column(String(48), unique=True, index=True)

    firmware: Mapped[Firmware] = relationship()


class OtaCommand(Base):
    """The journal: one row per `ota` command written to a device."""

    __tablename__ = "ota_commands"

    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"), index=True)
    firmware_id: Mapped[int] = mapped_column(ForeignKey("firmware.id"))
    rollout_id: Mapped[Optional[int]] = mapped_column(ForeignKey("rollouts.id"))
    url: Mapped[str] = mapped_column(String(255))
    sent_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The short key in the URL that ties a download to this offer (the token
    # never travels in the clear). NULL for commands sent before keys existed.
    offer_key: Mapped[Optional[str]] = mapped_column(String(16), unique=True)


class DeviceState:
    """Where one device stands in one rollout (the rules: ota/rollouts/device_states.py)."""

    PENDING = "pending"  # targeted, no `ota` sent yet (or waiting out a backoff)
    OFFERED = "offered"  # the `ota` frame was written to its socket
    DOWNLOADING = "downloading"  # its HTTP request for that offer arrived
    DOWNLOADED = "downloaded"  # the whole file was written to it
    # It logged in reporting the rollout's build after an attempt: judged
    # for its health window (crash loop, rollback) before it counts as updated.
    VERIFYING = "verifying"
    UPDATED = "updated"  # on the rollout's build (and through its health window)
    FAILED = "failed"  # attempts exhausted: never offered this rollout again
    CANCELLED = "cancelled"  # the rollout was stopped
    SUPERSEDED = "superseded"  # the rollout was replaced
    INCOMPATIBLE = "incompatible"  # its reported hardware cannot run the image
    ALL = (
        PENDING,
        OFFERED,
        DOWNLOADING,
        DOWNLOADED,
        VERIFYING,
        UPDATED,
        FAILED,
        CANCELLED,
        SUPERSEDED,
        INCOMPATIBLE,
    )
    IN_FLIGHT = (OFFERED, DOWNLOADING, DOWNLOADED)
    # Still to be decided: waiting for an offer, or an attempt under way.
    OPEN = (PENDING, *IN_FLIGHT, VERIFYING)
    # Nothing more will happen to the row unless an operator retries it.
    ENDED = (UPDATED, FAILED, CANCELLED, SUPERSEDED, INCOMPATIBLE)


class HealthOutcome:
    """How a device's health window ended (rollout_devices.health; ota/rollouts/health.py)."""

    PASSED = "passed"  # the window passed without trouble: updated
    CRASH_LOOP = "crash_loop"  # ota.health.max.logins logins inside the window
    ROLLBACK = "rollback"  # a login inside the window reported another build
    SILENCE = "silence"  # no login within ota.health.return of the download
    ALL = (PASSED, CRASH_LOOP, ROLLBACK, SILENCE)


class RolloutDevice(Base):
    """One device in one rollout: its state, attempts and when each step happened."""

    __tablename__ = "rollout_devices"
    __table_args__ = (
        UniqueConstraint("rollout_id", "device_id"),
        Index("ix_rollout_devices_state_next_attempt_at", "state", "next_attempt_at"),
        # A device's open attempts, read for every batch of info messages.
        Index("ix_rollout_devices_device_id_state", "device_id", "state"),
        # Download slots in use, per rollout: counted for every batch of offers.
        Index("ix_rollout_devices_state_rollout_id", "state", "rollout_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"))
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(default=0)
    already_current: Mapped[bool] = mapped_column(default=False)
    last_error: Mapped[Optional[str]] = mapped_column(String(255))
    # Times the device came back on another build after it had updated (a
    # rollback, a re-flash by hand): each one re-offers the rollout.
    reverts: Mapped[int] = mapped_column(default=0, server_default="0")
    # The node (and its run) that made the latest offer: when that run ended
    # before the download completed, the server cut the attempt short, and
    # the device is not charged for it.
    offer_node_id: Mapped[Optional[int]]
    offer_node_run: Mapped[Optional[int]]
    bytes_sent: Mapped[Optional[int]]  # of the latest download
    # Microseconds on MySQL too (0005): a backoff is kept to the fraction of a
    # second, and the times read in the order the steps happened.
    pending_at: Mapped[datetime] = mapped_column(PreciseDateTime, default=utcnow)
    first_offered_at: Mapped[Optional[datetime]] = mapped_column(PreciseDateTime)
    offered_at: Mapped[Optional[datetime]] = mapped_column(PreciseDateTime)
    downloading_at: Mapped[Optional[datetime]] = mapped_column(PreciseDateTime)
    downloaded_at: Mapped[Optional[datetime]] = mapped_column(PreciseDateTime)
    # When it first reported the rollout's build after an attempt (its health
    # window opened), and its logins since, that one included.
    verifying_at: Mapped[Optional[datetime]] = mapped_column(PreciseDateTime)
    health_logins: Mapped[int] = mapped_column(default=0, server_default="0")
    # The node (and its run) that held its last login in the window: when that
    # run has ended by the next login, the server closed the session, not the
    # device, and that login is not counted (health.py).
    health_node_id: Mapped[Optional[int]]
    health_node_run: Mapped[Optional[int]]
    health: Mapped[Optional[str]] = mapped_column(String(16))  # HealthOutcome; NULL: not judged
    # when it reported the rollout's build (after its health window, if it had one)
    updated_at: Mapped[Optional[datetime]] = mapped_column(PreciseDateTime)
    failed_at: Mapped[Optional[datetime]] = mapped_column(PreciseDateTime)
    ended_at: Mapped[Optional[datetime]] = mapped_column(PreciseDateTime)  # cancelled, superseded
    # backoff: no offer before this
    next_attempt_at: Mapped[Optional[datetime]] = mapped_column(PreciseDateTime)
    cohort_bucket: Mapped[Optional[int]]  # 0-99 from the hash of token and rollout
    wave: Mapped[Optional[int]]  # the wave (1, 2, ...) in which the device joined


class RolloutEvent(Base):
    """Append-only: every state change of a rollout or of a device in it."""

    __tablename__ = "rollout_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), index=True)
    device_id: Mapped[Optional[int]] = mapped_column(ForeignKey("devices.id"), index=True)
    from_state: Mapped[Optional[str]] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    detail: Mapped[Optional[str]] = mapped_column(String(255))
