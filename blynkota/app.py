"""The Flask application factory (flaskr style)."""

import logging
from collections.abc import Mapping

import click
from flask import Flask

from . import cli, web
from .cluster import ClusterNode, NodeSettings
from .config import ConfigError, load_settings
from .ota import (
    AdminDirectory,
    AuditTrail,
    FirmwareCache,
    FirmwareCatalog,
    FleetPolicy,
    FleetRegistry,
    HealthPolicy,
    OnlineDevices,
    RetryPolicy,
    build_service,
)
from .ota.firmware.signatures import load_public_keys
from .ota.notifications import WebhookNotifier
from .store import Database

__all__ = ["BadSettings", "create_app", "create_app_for_commands"]

log = logging.getLogger("blynkota")

# multipart boundaries and headers around the file; the file itself is checked
# against ota.max.size exactly.
_FORM_OVERHEAD = 64 * 1024


def create_app(config: Mapping[str, object] | None = None) -> Flask:
    """Defaults, then config/ files and BLYNKOTA_CONFIG, then environment, then `config`."""
    settings = load_settings(config)
    for warning in settings.warnings:
        log.warning("%s", warning)
    app = Flask("blynkota", static_folder=None)
    app.config["SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.ota_max_size + _FORM_OVERHEAD
    db = Database(
        settings.db_url, pool_size=settings.db_pool_size, pool_timeout=settings.db_pool_timeout
    )
    app.extensions["blynkota.db"] = db
    try:
        signing_keys = load_public_keys(list(settings.ota_signing_keys))
    except ValueError as error:
        raise ConfigError(f"ota.signing.keys: {error}") from None
    catalog = FirmwareCatalog(
        db,
        FirmwareCache(settings.firmware_folder),
        validate_image=settings.ota_validate_image,
        signing_keys=signing_keys,
    )
    policy = RetryPolicy(
        max_attempts=settings.ota_max_attempts,
        backoff=settings.ota_retry_backoff,
        attempt_timeout=settings.ota_attempt_timeout,
        offer_timeout=settings.ota_offer_timeout,
    )
    fleet_policy = FleetPolicy(
        max_concurrent=settings.ota_max_concurrent,
        push_online=settings.ota_push_online,
        wave_min_devices=settings.ota_wave_min_devices,
        abort_failure_ratio=settings.ota_abort_failure_ratio,
        abort_min_devices=settings.ota_abort_min_devices,
    )
    health_policy = HealthPolicy(
        window=settings.ota_health_window,
        max_logins=settings.ota_health_max_logins,
        returns_within=settings.ota_health_return,
    )
    control = Database(settings.db_url, pool_size=1)
    control.health = db.health  # one outage, logged once
    node = ClusterNode(db, NodeSettings(heartbeat=settings.node_heartbeat), control=control)
    app.extensions["blynkota.control_db"] = node.control
    app.extensions["blynkota"] = build_service(
        db,
        catalog,
        OnlineDevices(),
        node,
        policy=policy,
        fleet_policy=fleet_policy,
        health_policy=health_policy,
        notifier=WebhookNotifier(
            db, settings.webhook_urls, settings.webhook_secret, settings.webhook_backoff
        ),
    )
    if settings.webhook_urls and not settings.webhook_secret:
        log.warning("notify.webhook.urls without notify.webhook.secret: webhooks go unsigned")
    app.extensions["blynkota.fleet"] = FleetRegistry(db)
    app.extensions["blynkota.admins"] = AdminDirectory(db)
    app.extensions["blynkota.audit"] = AuditTrail(db)

    web.init_app(app)
    cli.init_app(app)
    return app


class BadSettings(click.ClickException):
    """A setting that cannot be used: one line, exit code 2 (as `python wsgi.py`)."""

    exit_code = 2


def create_app_for_commands() -> Flask:
    """The app as `flask --app wsgi` and `blynkota` load it: a bad setting is one line."""
    try:
        return create_app()
    except ConfigError as error:
        raise BadSettings(str(error)) from None
