"""The admin port's certificate: the configured one, or a self-signed pair made once."""

import datetime
import ipaddress
import logging
import os
import socket
import ssl
from pathlib import Path

from .config import ConfigError

__all__ = ["check_certificate", "ensure_certificate"]

log = logging.getLogger(__name__)


def check_certificate(cert_path: Path, key_path: Path, *, configured: bool) -> None:
    """Make sure the admin port can serve TLS, before anything listens.

    A pair the operator configured must exist, parse and belong together: a
    mistake there is a one-line ConfigError (exit 2), not a server that says
    it listens while every handshake fails. Without configuration, a
    self-signed pair is made once in the data folder.
    """
    if configured:
        for key, path in (("server.ssl.cert", cert_path), ("server.ssl.key", key_path)):
            if not path.is_file():
                raise ConfigError(f"{key}: {path} does not exist")
    else:
        ensure_certificate(cert_path, key_path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path)
    except ssl.SSLError as error:
        reason = error.reason or str(error)
        if reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"server.ssl.key: {key_path} is not the key of the certificate {cert_path}"
            ) from None
        raise ConfigError(
            f"server.ssl.cert/server.ssl.key: {cert_path} and {key_path} are not a PEM "
            f"certificate and its key ({reason})"
        ) from None
    except OSError as error:
        raise ConfigError(f"server.ssl.cert/server.ssl.key: cannot read ({error})") from None


def ensure_certificate(cert_path: Path, key_path: Path) -> None:
    if cert_path.exists() and key_path.exists():
        return
    if cert_path.exists() or key_path.exists():
        raise ConfigError(f"only one of {cert_path} and {key_path} exists: give both or neither")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    hostname = socket.gethostname()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(hostname),
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        mode=0o600,
    )
    _write_atomically(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info("generated a self-signed certificate %s for the admin port", cert_path)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
