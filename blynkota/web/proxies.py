"""X-Forwarded-* from trusted proxies only.

Behind HAProxy (or any TLS-terminating proxy) the admin API arrives as plain
HTTP with `X-Forwarded-Proto: https`. Werkzeug's ProxyFix believes those
headers from anyone; here it is applied only to requests whose peer address
is in `trusted.proxies`, so a client elsewhere cannot claim HTTPS or another
address (and pass `allowed.administrator.ips` with it).
"""

from werkzeug.middleware.proxy_fix import ProxyFix

from .addresses import address_in

__all__ = ["TrustedProxies"]


class TrustedProxies:
    def __init__(self, app, networks) -> None:
        self.app = app
        self.networks = tuple(networks)
        self.fixed = ProxyFix(app, x_for=1, x_proto=1, x_host=0, x_port=0, x_prefix=0)

    def __call__(self, environ, start_response):
        if self.networks and address_in(environ.get("REMOTE_ADDR"), self.networks):
            return self.fixed(environ, start_response)
        return self.app(environ, start_response)
