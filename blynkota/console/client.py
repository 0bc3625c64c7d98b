"""A client of a running server's admin API (HTTPS, basic auth), for the `blynkota` command.

The upload streams the file in chunks, so a progress bar can follow it and
a large image is never held twice in memory.
"""

import base64
import http.client
import json
import ssl
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

__all__ = ["AdminClient", "AdminError", "Target"]

CHUNK = 64 * 1024
TIMEOUT = 60.0  # seconds for the server to answer one request


class AdminError(Exception):
    """The server refused (its one-line reason), or could not be reached."""


@dataclass(frozen=True)
class Target:
    """Where the admin API is, and who asks."""

    url: str  # https://host:port
    email: str
    password: str
    ca_file: Path | None = None  # None: the system's CAs
    insecure: bool = False  # no certificate check at all


class AdminClient:
    def __init__(self, target: Target) -> None:
        parts = urlsplit(target.url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise AdminError(f"--url must look like https://host:9443, not {target.url!r}")
        self.target = target
        self._parts = parts
        credentials = f"{target.email}:{target.password}".encode()
        self._auth = "Basic " + base64.b64encode(credentials).decode("ascii")

    def _connection(self) -> http.client.HTTPConnection:
        host, port = self._parts.hostname, self._parts.port
        if self._parts.scheme == "http":
            return http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        if self.target.insecure:
            context = ssl._create_unverified_context()  # the operator asked for --insecure
        else:
            ca = str(self.target.ca_file) if self.target.ca_file else None
            try:
                context = ssl.create_default_context(cafile=ca)
            except (OSError, ssl.SSLError) as error:
                raise AdminError(f"--ca-file {ca}: cannot read it ({error})") from None
        return http.client.HTTPSConnection(host, port, timeout=TIMEOUT, context=context)

    def request(
        self,
        method: str,
        path: str,
        query: dict[str, object] | None = None,
        *,
        body=None,
        headers: dict[str, str] | None = None,
    ):
        """The answer's JSON (or text); AdminError with the server's reason on a 4xx/5xx."""
        if query:
            path += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Authorization": self._auth, "Accept": "application/json", **(headers or {})}
        connection = self._connection()
        try:
            connection.request(method, path, body=body, headers=headers)
            answer = connection.getresponse()
            data = answer.read()
        except ssl.SSLCertVerificationError as error:
            raise AdminError(
                f"{self.target.url}: the certificate is not trusted ({error.verify_message}); "
                "give the server's certificate with --ca-file (its data/tls/cert.pem), "
                "or --insecure"
            ) from None
        except (OSError, http.client.HTTPException) as error:
            raise AdminError(f"cannot reach {self.target.url}: {error}") from None
        finally:
            connection.close()
        text = data.decode("utf-8", "replace")
        if answer.status >= 400:
            raise AdminError(f"{answer.status}: {text.strip()}")
        if answer.headers.get("Content-Type", "").startswith("application/json"):
            return json.loads(text)
        return text.strip()

    def upload(
        self,
        path: str,
        query: dict[str, object],
        firmware: Path,
        progress: Callable[[int], None] = lambda sent: None,
    ):
        """POST the file as multipart form data (field `file`), calling `progress(bytes)`."""
        boundary = uuid.uuid4().hex
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{_quoted(firmware.name)}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        size = firmware.stat().st_size

        def body() -> Iterator[bytes]:
            yield head
            with firmware.open("rb") as handle:
                while chunk := handle.read(CHUNK):
                    yield chunk
                    progress(len(chunk))
            yield tail

        return self.request(
            "POST",
            path,
            query,
            body=body(),
            headers={
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(len(head) + size + len(tail)),
            },
        )


def _quoted(name: str) -> str:
    return name.replace("\\", "_").replace('"', "_").replace("\r", "_").replace("\n", "_")
