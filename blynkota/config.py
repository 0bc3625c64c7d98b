"""Settings: defaults, then properties files, then environment, then overrides.

The keys are the Blynk server's `server.properties` keys where Blynk has one,
so an operator's existing file keeps working. Every key can also be set from
the environment as BLYNKOTA_<KEY> with dots and dashes as underscores
(`db.url` -> BLYNKOTA_DB_URL). BLYNKOTA_CONFIG names the properties file for
every entry point: the server, the `flask` CLI and `alembic`.
"""

import difflib
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import javaproperties
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

__all__ = [
    "DEFAULTS",
    "ConfigError",
    "Settings",
    "load_settings",
    "parse_properties",
    "IN_CHECKOUT",
    "PROJECT_ROOT",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# In a checkout the data folder sits beside wsgi.py, whatever the working
# directory: `flask --app main/wsgi.py` from the parent finds the same fleet.
# Installed as a package, ./data of the working directory (as Blynk does).
IN_CHECKOUT = (PROJECT_ROOT / "wsgi.py").is_file() and (PROJECT_ROOT / "blynkota").is_dir()
_DEFAULT_DATA = str(PROJECT_ROOT / "data") if IN_CHECKOUT else "./data"

DEFAULTS: dict[str, str] = {
    "http.port": "8080",
    "https.port": "9443",
    "listen.address": "0.0.0.0",
    "server.host": "",
    "server.http.port": "0",
    "admin.email": "admin@blynk.cc",
    "admin.pass": "admin",
    "allowed.administrator.ips": "0.0.0.0/0,::/0",
    "hard.socket.idle.timeout": "10",
    "data.folder": _DEFAULT_DATA,
    "db.url": "",
    "db.pool.size": "20",
    "db.pool.timeout": "30",
    "server.ssl.cert": "",
    "server.ssl.key": "",
    "ota.max.size": str(16 * 1024 * 1024),
    "ota.validate.image": "true",
    "ota.signing.keys": "",
    "ota.max.attempts": "3",
    "ota.retry.backoff": "60",
    "ota.attempt.timeout": "900",
    "ota.offer.timeout": "120",
    "ota.health.window": "600",
    "ota.health.max.logins": "3",
    "ota.health.return": "300",
    "ota.sweep.interval": "5",
    "ota.push.online": "false",
    "ota.max.concurrent": "50",
    "ota.wave.min.devices": "10",
    "ota.abort.failure.ratio": "0.2",
    "ota.abort.min.devices": "10",
    "hardware.max.connections": "15000",
    "hardware.listen.backlog": "4096",
    "hardware.max.messages.per.sec": "100",
    "http.max.connections": "1024",
    "shutdown.grace.seconds": "5",
    "log.level": "INFO",
    "log.format": "text",
    "allowed.metrics.ips": "127.0.0.1/32,::1/128",
    "node.name": "",
    "node.heartbeat.interval": "2",
    "node.poll.interval": "0.25",
    "trusted.proxies": "",
    "relay.upstream": "",
    "relay.upstream.ssl": "false",
    "relay.connect.timeout": "5",
    "notify.webhook.urls": "",
    "notify.webhook.secret": "",
    "notify.webhook.backoff": "10",
}

DEFAULT_ADMIN_PASS = DEFAULTS["admin.pass"]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
# Keys holding a path: in a properties file, relative to that file's folder.
PATH_KEYS = ("data.folder", "server.ssl.cert", "server.ssl.key")
# relay.upstream.ssl: these words, or else the path of a CA file.
RELAY_SSL_WORDS = ("false", "true", "insecure")
# Databases the server runs on, with the driver that yields to gevent.
DATABASES = {
    "sqlite": "sqlite:///path/to/blynkota.db",
    "mysql": "mysql+pymysql://user:pass@host/db",
}


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the key."""


def parse_properties(text: str) -> dict[str, str]:
    """Java properties as the Blynk server reads them (java.util.Properties):
    `key=value`, `key: value`, `key value`, # and ! comments, continuation
    lines, backslash escapes and \\uXXXX."""
    try:
        return javaproperties.loads(text)
    except ValueError as error:  # a malformed \\u escape
        raise ConfigError(f"cannot read the properties: {error}") from None


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, DEFAULTS, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _read_file(path: Path, warnings: list[str]) -> dict[str, str]:
    """One properties file's values, its paths made absolute from its folder."""
    try:
        values = parse_properties(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"properties file {path}: cannot read it ({error})") from None
    for key in values:
        if key not in DEFAULTS:
            warnings.append(f"{path}: unknown key {key!r} ignored{_did_you_mean(key)}")
    for key in PATH_KEYS:
        if values.get(key):
            values[key] = str((path.parent / Path(values[key]).expanduser()).absolute())
    ssl = values.get("relay.upstream.ssl", "").strip()
    if ssl and ssl.lower() not in RELAY_SSL_WORDS:  # a CA file, relative to the file
        values["relay.upstream.ssl"] = str((path.parent / Path(ssl).expanduser()).absolute())
    if values.get("ota.signing.keys"):  # a list of paths, each relative to the file
        values["ota.signing.keys"] = ",".join(
            str((path.parent / part).absolute()) for part in _paths(values["ota.signing.keys"])
        )
    return {key: value for key, value in values.items() if key in DEFAULTS}


def _env_name(key: str) -> str:
    return "BLYNKOTA_" + key.upper().replace(".", "_").replace("-", "_")


# BLYNKOTA_ variables that are not settings: the properties file, the `blynkota`
# command's target, and the test suite's switches.
OTHER_VARIABLES = {
    "BLYNKOTA_CONFIG",
    "BLYNKOTA_URL",
    "BLYNKOTA_CA_FILE",
    "BLYNKOTA_TEST_MYSQL_URL",
    "BLYNKOTA_REQUIRE_MYSQL",
    "BLYNKOTA_REQUIRE_BROWSER",
}


def _unknown_variables(environ: Mapping[str, str], warnings: list[str]) -> None:
    """A BLYNKOTA_ variable that names no setting (a typo) is told, never silently ignored."""
    known = {_env_name(key) for key in DEFAULTS} | OTHER_VARIABLES
    # Compared without the prefix they all share, which would make any two alike.
    names = {name.removeprefix("BLYNKOTA_"): name for name in known}
    for name in sorted(environ):
        if name.startswith("BLYNKOTA_") and name not in known:
            close = difflib.get_close_matches(name.removeprefix("BLYNKOTA_"), sorted(names), n=1)
            hint = f" (did you mean {names[close[0]]}?)" if close else ""
            warnings.append(f"environment: unknown variable {name} ignored{hint}")


@dataclass(frozen=True)
class Settings:
    http_port: int
    https_port: int
    listen_address: str
    server_host: str
    server_http_port: int  # 0: the port the device connected to
    admin_email: str
    admin_pass: str
    allowed_admin_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    login_timeout: float
    data_folder: Path
    db_url: str
    db_pool_size: int
    db_pool_timeout: float
    ssl_cert: Path
    ssl_configured: bool  # the operator named a certificate or key (else one is made)
    ssl_key: Path
    ota_max_size: int
    ota_validate_image: bool
    ota_signing_keys: tuple[Path, ...]  # PEM public keys: every upload must be signed by one
    ota_max_attempts: int
    ota_retry_backoff: float
    ota_attempt_timeout: float
    ota_offer_timeout: float
    ota_health_window: float  # seconds a device verifies the new build (0: no window)
    ota_health_max_logins: int  # logins inside the window that make it a crash loop
    ota_health_return: float  # seconds from a download to the login (0: not judged)
    ota_sweep_interval: float
    ota_push_online: bool
    ota_max_concurrent: int
    ota_wave_min_devices: int
    ota_abort_failure_ratio: float
    ota_abort_min_devices: int
    max_connections: int
    listen_backlog: int
    max_messages_per_sec: int
    max_http_connections: int
    shutdown_grace: float
    log_level: str
    node_name: str
    node_heartbeat: float
    node_poll_interval: float
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    log_format: str  # text or json
    allowed_metrics_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    # Relay mode: the Blynk server's hardware port (host, port), or None (standalone).
    relay_upstream: tuple[str, int] | None
    relay_ssl: str  # "false", "true" (the system's CAs), "insecure", or a CA file's path
    relay_connect_timeout: float
    # Rollout events POSTed as JSON to these URLs (ota/notifications.py), signed
    # with an HMAC-SHA256 of the body under the secret; retried from `backoff` s.
    webhook_urls: tuple[str, ...]
    webhook_secret: str
    webhook_backoff: float
    source: str  # which properties file was read, for the start-up log
    # Keys that were ignored (a typo, say), one line each, for the start-up log.
    warnings: tuple[str, ...] = field(default=())

    @property
    def firmware_folder(self) -> Path:
        return self.data_folder / "ota"

    @property
    def is_sqlite(self) -> bool:
        return self.db_url.startswith("sqlite")

    @property
    def uses_default_password(self) -> bool:
        return self.admin_pass == DEFAULT_ADMIN_PASS


def _integer(values: Mapping[str, str], key: str, low: int, high: int) -> int:
    try:
        number = int(values[key])
    except ValueError:
        raise ConfigError(f"{key}: {values[key]!r} is not a whole number") from None
    if not low <= number <= high:
        raise ConfigError(f"{key}: {number} is not between {low} and {high}")
    return number


def _number(values: Mapping[str, str], key: str, low: float, high: float) -> float:
    try:
        number = float(values[key])
    except ValueError:
        raise ConfigError(f"{key}: {values[key]!r} is not a number") from None
    if not low <= number <= high:
        raise ConfigError(f"{key}: {number:g} is not between {low:g} and {high:g}")
    return number


def _paths(text: str) -> tuple[Path, ...]:
    """A comma-separated list of paths (`~` expanded), empty items left out."""
    return tuple(Path(part.strip()).expanduser() for part in text.split(",") if part.strip())


def _urls(values: Mapping[str, str], key: str) -> tuple[str, ...]:
    """A comma-separated list of http(s) URLs, each at most 255 characters."""
    urls = tuple(part.strip() for part in values[key].split(",") if part.strip())
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 255:
            raise ConfigError(
                f"{key}: {url[:60]!r} is not an http(s) URL of at most 255 characters"
            )
    return urls


def _boolean(values: Mapping[str, str], key: str) -> bool:
    text = values[key].strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ConfigError(f"{key}: {values[key]!r} is not true or false")


def _networks(values: Mapping[str, str], key: str):
    networks = []
    for item in values[key].split(","):
        if item.strip():
            try:
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ConfigError(f"{key}: {item.strip()!r} is not a CIDR range") from None
    return tuple(networks)


def _choice(values: Mapping[str, str], key: str, choices: tuple[str, ...], *, upper: bool) -> str:
    value = values[key].strip()
    value = value.upper() if upper else value.lower()
    if value not in choices:
        raise ConfigError(f"{key}: {values[key]!r} is not one of {', '.join(choices)}")
    return value


def _address(values: Mapping[str, str], key: str) -> str:
    text = values[key].strip()
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(
            f"{key}: {values[key]!r} is not an IP address (0.0.0.0 for all, 127.0.0.1, ::)"
        ) from None
    return text


def _host_port(values: Mapping[str, str], key: str) -> tuple[str, int] | None:
    """host:port ([::1]:port for IPv6), or None for an empty value."""
    text = values[key].strip()
    if not text:
        return None
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isascii() or not port.isdigit():
        raise ConfigError(f"{key}: {text!r} is not host:port (blynk.example.com:8080)")
    number = int(port)
    if not 1 <= number <= 65535:
        raise ConfigError(f"{key}: port {number} is not between 1 and 65535")
    return host, number


def _relay_ssl(values: Mapping[str, str], key: str) -> str:
    text = values[key].strip()
    if text.lower() in RELAY_SSL_WORDS:
        return text.lower()
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"{key}: {text!r} is neither {', '.join(RELAY_SSL_WORDS)} nor a CA file that exists"
        )
    return str(path.absolute())


def _database_url(text: str) -> str:
    try:
        url = make_url(text)
    except ArgumentError:
        raise ConfigError(
            f"db.url: {text.split('://')[0]!r}... is not a database URL (e.g. {DATABASES['mysql']})"
        ) from None
    backend = url.get_backend_name()
    if backend == "mariadb":
        backend = "mysql"
    if backend not in DATABASES:
        raise ConfigError(
            f"db.url: {backend!r} is not a supported database; use SQLite "
            f"({DATABASES['sqlite']}) or MySQL/MariaDB ({DATABASES['mysql']})"
        )
    if backend == "mysql" and url.get_driver_name() != "pymysql":
        raise ConfigError(
            f"db.url: the {url.get_driver_name()!r} driver blocks the server's event loop; "
            f"use mysql+pymysql:// ({DATABASES['mysql']})"
        )
    return text


def load_settings(
    overrides: Mapping[str, object] | None = None,
    *,
    properties_file: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    environ = os.environ if environ is None else environ
    values = dict(DEFAULTS)
    sources, warnings = [], []
    template = PROJECT_ROOT / "config" / "server.properties"
    chosen = properties_file or environ.get("BLYNKOTA_CONFIG")
    if IN_CHECKOUT and template.is_file():
        values.update(_read_file(template, warnings))
        sources.append(str(template))
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise ConfigError(f"properties file {path} does not exist")
        values.update(_read_file(path, warnings))
        sources.append(str(path))
    for key in DEFAULTS:
        if _env_name(key) in environ:
            values[key] = environ[_env_name(key)]
    _unknown_variables(environ, warnings)
    for key, value in (overrides or {}).items():
        values[key] = str(value)

    data_folder = Path(values["data.folder"]).expanduser().absolute()
    db_url = (
        _database_url(values["db.url"])
        if values["db.url"]
        else (f"sqlite:///{data_folder / 'blynkota.db'}")
    )
    tls_folder = data_folder / "tls"
    return Settings(
        http_port=_integer(values, "http.port", 0, 65535),
        https_port=_integer(values, "https.port", 0, 65535),
        listen_address=_address(values, "listen.address"),
        server_host=values["server.host"],
        server_http_port=_integer(values, "server.http.port", 0, 65535),
        admin_email=values["admin.email"],
        admin_pass=values["admin.pass"],
        allowed_admin_networks=_networks(values, "allowed.administrator.ips"),
        login_timeout=_integer(values, "hard.socket.idle.timeout", 1, 3600),
        data_folder=data_folder,
        db_url=db_url,
        db_pool_size=_integer(values, "db.pool.size", 1, 1000),
        db_pool_timeout=_number(values, "db.pool.timeout", 0.1, 600),
        ssl_cert=Path(values["server.ssl.cert"] or tls_folder / "cert.pem"),
        ssl_configured=bool(values["server.ssl.cert"] or values["server.ssl.key"]),
        ssl_key=Path(values["server.ssl.key"] or tls_folder / "key.pem"),
        ota_max_size=_integer(values, "ota.max.size", 1, 1 << 31),
        ota_validate_image=_boolean(values, "ota.validate.image"),
        ota_signing_keys=_paths(values["ota.signing.keys"]),
        ota_max_attempts=_integer(values, "ota.max.attempts", 1, 100),
        ota_retry_backoff=_number(values, "ota.retry.backoff", 0, 7 * 86400),
        ota_attempt_timeout=_number(values, "ota.attempt.timeout", 0.1, 7 * 86400),
        ota_offer_timeout=_number(values, "ota.offer.timeout", 0.1, 7 * 86400),
        ota_health_window=_number(values, "ota.health.window", 0, 7 * 86400),
        ota_health_max_logins=_integer(values, "ota.health.max.logins", 2, 1000),
        ota_health_return=_number(values, "ota.health.return", 0, 7 * 86400),
        ota_sweep_interval=_number(values, "ota.sweep.interval", 0.05, 3600),
        ota_push_online=_boolean(values, "ota.push.online"),
        ota_max_concurrent=_integer(values, "ota.max.concurrent", 1, 1_000_000),
        ota_wave_min_devices=_integer(values, "ota.wave.min.devices", 1, 1_000_000),
        ota_abort_failure_ratio=_number(values, "ota.abort.failure.ratio", 0, 1),
        ota_abort_min_devices=_integer(values, "ota.abort.min.devices", 1, 1_000_000),
        max_connections=_integer(values, "hardware.max.connections", 1, 1_000_000),
        listen_backlog=_integer(values, "hardware.listen.backlog", 1, 1_000_000),
        max_messages_per_sec=_integer(values, "hardware.max.messages.per.sec", 1, 1_000_000),
        max_http_connections=_integer(values, "http.max.connections", 1, 1_000_000),
        shutdown_grace=_integer(values, "shutdown.grace.seconds", 0, 3600),
        log_level=_choice(values, "log.level", LOG_LEVELS, upper=True),
        node_name=values["node.name"].strip(),
        node_heartbeat=_number(values, "node.heartbeat.interval", 0.05, 600),
        node_poll_interval=_number(values, "node.poll.interval", 0.01, 60),
        trusted_proxies=_networks(values, "trusted.proxies"),
        log_format=_choice(values, "log.format", LOG_FORMATS, upper=False),
        allowed_metrics_networks=_networks(values, "allowed.metrics.ips"),
        relay_upstream=_host_port(values, "relay.upstream"),
        relay_ssl=_relay_ssl(values, "relay.upstream.ssl"),
        relay_connect_timeout=_number(values, "relay.connect.timeout", 0.1, 120),
        webhook_urls=_urls(values, "notify.webhook.urls"),
        webhook_secret=values["notify.webhook.secret"],
        webhook_backoff=_number(values, "notify.webhook.backoff", 0.1, 3600),
        source=", ".join(sources) or "built-in defaults",
        warnings=tuple(warnings),
    )
