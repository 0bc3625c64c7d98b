"""Who may use /admin: HTTPS only, allowed addresses only, basic auth against
the admins table, and each route open to the roles that may use it: every
route names the least role it needs (`auth.login_required(role=...)`)."""

from flask import Response, current_app, g, request
from flask_httpauth import HTTPBasicAuth

from ..store import AdminRole
from .addresses import address_in, client_address

__all__ = ["ADMIN", "OPERATOR", "VIEWER", "auth", "guard_admin_request"]

auth = HTTPBasicAuth(realm="blynkota admin")

VIEWER, OPERATOR, ADMIN = AdminRole.VIEWER, AdminRole.OPERATOR, AdminRole.ADMIN


@auth.get_user_roles
def _roles(email: str) -> list[str]:
    """An account's role and every role below it (an operator may view)."""
    role = current_app.extensions["blynkota.admins"].role_of(email)
    return list(AdminRole.ALL[: AdminRole.ALL.index(role) + 1]) if role in AdminRole.ALL else []


@auth.verify_password
def _verify(email: str, password: str) -> str | None:
    if not email:
        return None
    directory = current_app.extensions["blynkota.admins"]
    return email if directory.check(email, password, request.remote_addr or "-") else None


@auth.error_handler
def _auth_error(status: int) -> Response:
    if status == 403:  # signed in, but the role does not allow it
        g.refused_admin = email = request.authorization.username  # for the audit trail
        role = current_app.extensions["blynkota.admins"].role_of(email)
        return Response(
            f"Not allowed for the {role} role: viewers read, operators also steer rollouts, "
            "admins also delete devices and firmware.\n",
            403,
            mimetype="text/plain",
        )
    # Blynk's answer to wrong credentials is 403; with none at all, 401 asks for them.
    if request.authorization is not None:
        return Response("Authentication failed.\n", 403, mimetype="text/plain")
    return Response(
        "Authentication required: send basic auth credentials (curl -u email:password).\n",
        401,
        mimetype="text/plain",
    )


def guard_admin_request() -> Response | None:
    """Refuse plain HTTP before any password travels, and addresses not allowed."""
    settings = current_app.config["SETTINGS"]
    if not request.is_secure:
        return Response(
            f"Admin routes are served over HTTPS only: use https://<host>:"
            f"{settings.https_port}{request.path}\n",
            403,
            mimetype="text/plain",
        )
    if not address_in(request.remote_addr, settings.allowed_admin_networks):
        return Response(
            f"Address {request.remote_addr} is not in allowed.administrator.ips.\n",
            403,
            mimetype="text/plain",
        )
    if settings.uses_default_password and not client_address(request.remote_addr).is_loopback:
        # Everyone knows the default: only this machine may use it.
        return Response(
            "admin.pass is still the default: set it in server.properties, "
            "then the admin API answers other addresses.\n",
            403,
            mimetype="text/plain",
        )
    return None
