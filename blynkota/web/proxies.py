"""X-Forwarded-* from trusted proxies only.

Behind HAProxy (or any TLS-terminating proxy) the admin API arrives as plain
HTTP with `X-Forwarded-Proto: https`. Werkzeug's ProxyFix believes those
headers from anyone; here it is applied only to requests whose peer address
is in `trusted.proxies`, so a client elsewhere cannot claim HTTPS or another
address (and pass `allowed.administrator.ips` with it).
"""

import ipaddress

from werkzeug.middleware.proxy_fix import ProxyFix

__all__ = ["TrustedProxies"]


class TrustedProxies:
    def __init__(self, app, networks) -> None:
        self.app = app
        self.networks = tuple(networks)
        self.fixed = ProxyFix(app, x_for=1, x_proto=1, x_host=0, x_port=0, x_prefix=0)

    def _trusted(self, address: str) -> bool:
        try:
            peer = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if peer.version == 6 and peer.ipv4_mapped:
            peer = peer.ipv4_mapped
        return any(peer in network for network in self.networks)

    def __call__(self, environ, start_response):
        if self.networks and self._trusted(environ.get("REMOTE_ADDR", "")):
            return self.fixed(environ, start_response)
        return self.app(environ, start_response)
