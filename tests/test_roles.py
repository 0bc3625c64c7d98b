"""Roles on every admin route, and the audit trail of every change (issue 29).

The table below is the contract, written apart from the code: each route
and method of the admin API and the dashboard with the least role it needs.
A route missing from it fails the test, so none is added without a role.
"""

import pytest

from blynkota.logsafe import token_tag

from .devices import BUILD_NEW
from .images import esp8266_image
from .servers import ADMIN_EMAIL
from .test_cli import run

PASSWORD = "role-test-pass"
ACCOUNTS = {role: (f"{role}@example.com", PASSWORD) for role in ("viewer", "operator", "admin")}
ORDER = ("viewer", "operator", "admin")
TOKEN = "0123456789abcdef0123456789abcdef"  # no such device: nothing is changed by a call

# (method, path as called, Flask rule) -> the least role it needs.
ROUTES = {
    ("GET", "/admin/ota/status", "/admin/ota/status"): "viewer",
    ("GET", "/admin/ota/rollouts/999", "/admin/ota/rollouts/<rollout_id>"): "viewer",
    ("GET", "/admin/devices", "/admin/devices"): "viewer",
    ("GET", "/admin/firmware", "/admin/firmware"): "viewer",
    ("GET", "/admin/webhooks", "/admin/webhooks"): "viewer",
    ("GET", "/admin/audit", "/admin/audit"): "viewer",
    ("GET", "/admin/openapi.json", "/admin/openapi.json"): "viewer",
    ("GET", "/admin/", "/admin/"): "viewer",
    ("GET", "/admin/rollouts/999", "/admin/rollouts/<rollout_id>"): "viewer",
    ("GET", "/admin/fleet", "/admin/fleet"): "viewer",
    ("GET", "/admin/upload", "/admin/upload"): "viewer",
    ("GET", "/admin/activity", "/admin/activity"): "viewer",
    ("GET", "/admin/fleet/devices", "/admin/fleet/devices"): "viewer",
    ("GET", "/admin/fleet/devices/999", "/admin/fleet/devices/<device_id>"): "viewer",
    ("POST", "/admin/fleet/devices/999/tags", "/admin/fleet/devices/<device_id>/tags"):
    "operator",
    ("POST", f"/admin/devices/{TOKEN}/tags?tag=x", "/admin/devices/<token>/tags"): "operator",
    ("DELETE", f"/admin/devices/{TOKEN}/tags/x", "/admin/devices/<token>/tags/<tag>"): "operator",
    ("POST", "/admin/ota/start?user=nobody@example.com", "/admin/ota/start"): "operator",
    ("GET", f"/admin/ota/start?fileName=x&token={TOKEN}", "/admin/ota/start"): "operator",
    ("GET", "/admin/ota/stop?rollout=999", "/admin/ota/stop"): "operator",
    ("POST", "/admin/ota/stop?rollout=999", "/admin/ota/stop"): "operator",
    **{
        ("POST", f"/admin/ota/rollouts/999/{action}", f"/admin/ota/rollouts/<rollout_id>/{action}"):
        "operator"
        for action in ("pause", "resume", "stop", "retry", "expand")
    },
    ("POST", "/admin/rollouts/999/action", "/admin/rollouts/<rollout_id>/action"): "operator",
    ("DELETE", f"/admin/devices/{TOKEN}", "/admin/devices/<token>"): "admin",
    ("DELETE", "/admin/firmware/" + "0" * 24, "/admin/firmware/<name>"): "admin",
}  # fmt: skip


@pytest.fixture
def accounts(app):
    directory = app.extensions["blynkota.admins"]
    for role, (email, password) in ACCOUNTS.items():
        directory.add(email, password, role)
    return ACCOUNTS


def test_the_table_names_every_admin_route(app):
    served = {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/admin") and "static" not in rule.endpoint
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert served == {(method, rule) for method, _, rule in ROUTES}


def test_each_role_on_each_route(server, accounts):
    """Below the route's role: 403 with the reason. At or above it: anything
    but 403 (a 404 for the rollout 999, a 400 for the unknown user...)."""
    for (method, path, _), needed in ROUTES.items():
        for role in ORDER:
            form = {"action": "pause"} if path.endswith("/action") else None
            answer = server.admin(method, path, auth=accounts[role], form=form)
            if ORDER.index(role) < ORDER.index(needed):
                assert answer.status == 403, (role, method, path, answer.status)
                assert answer.text.startswith(f"Not allowed for the {role} role"), answer.text
            else:
                assert answer.status != 403, (role, method, path, answer.text)
                assert answer.status < 500, (role, method, path, answer.text)


def test_every_change_is_in_the_audit_trail(server, accounts, app, fleet):
    operator, viewer = accounts["operator"], accounts["viewer"]
    token = fleet.add_device("me@example.com", "Farm")
    files = {"file": ("fw.bin", esp8266_image(BUILD_NEW))}
    started = server.admin("POST", "/admin/ota/start?user=me@example.com&percent=50",
                           files=files, auth=operator)  # fmt: skip
    assert started.status == 200
    (rollout,) = server.admin("GET", "/admin/ota/status", auth=viewer).json()
    refused = server.admin("POST", f"/admin/ota/rollouts/{rollout['id']}/pause", auth=viewer)
    assert refused.status == 403
    assert server.admin("POST", f"/admin/ota/rollouts/{rollout['id']}/pause",
                        auth=operator).status == 200  # fmt: skip
    resumed = server.admin("POST", f"/admin/rollouts/{rollout['id']}/action",
                           form={"action": "resume"}, auth=operator)  # fmt: skip
    assert resumed.status == 303  # back to the rollout page
    offline = server.admin("POST", f"/admin/ota/start?token={token}", files=files, auth=operator)
    assert offline.status == 400  # not in session: refused, and recorded
    dry = server.admin("POST", "/admin/ota/start?dryRun=true", files=files, auth=operator)
    assert dry.status == 200  # changes nothing: not recorded
    assert run(app, "devices", "add", "--user", "cli@example.com", "--project", "P").exit_code == 0
    trail = server.admin("GET", "/admin/audit?limit=10", auth=viewer).json()
    entries = trail["entries"]
    assert trail["total"] == len(entries) == 6
    newest = [(e["admin"], e["action"], e["status"]) for e in entries]
    cli = entries[0]
    assert cli["admin"].startswith("command line (") and cli["address"] == "command line"
    assert (cli["action"], cli["status"], cli["detail"]) == (
        "add device",
        200,
        "cli@example.com / P",
    )
    assert newest[1:] == [
        (operator[0], "start", 400),
        (operator[0], "resume", 303),
        (operator[0], "pause", 200),
        (viewer[0], "pause", 403),
        (operator[0], "start", 200),
    ]
    start = entries[-1]
    assert start["rollout"] == rollout["id"] and start["address"] == "127.0.0.1"
    assert start["firmware"] == rollout["firmware"]["name"]
    assert start["detail"] == "POST /admin/ota/start?user=me@example.com&percent=50"
    assert entries[1]["device"] == token_tag(token)
    assert all(e["rollout"] == rollout["id"] for e in entries[2:])
    assert token not in server.admin("GET", "/admin/audit", auth=viewer).text
    page = server.admin("GET", "/admin/activity", auth=viewer).text
    assert "<h1>Audit trail</h1>" in page and token_tag(token) in page


def test_admin_accounts_from_the_command_line(app):
    added = app.test_cli_runner().invoke(
        args=["admins", "add", "ops@example.com", "--role", "operator"],
        input="long-enough\nlong-enough\n",
    )
    assert added.exit_code == 0, added.output
    assert "Added ops@example.com as operator." in added.output
    short = run(app, "admins", "add", "x@example.com", "--password", "short")
    assert short.exit_code == 1 and "at least 8 characters" in short.output
    assert run(app, "admins", "role", "ops@example.com", "admin").exit_code == 0
    listed = run(app, "admins", "list").output
    assert "ops@example.com  admin" in listed
    app.extensions["blynkota.admins"].seed(ADMIN_EMAIL, "seeded-pass")
    assert run(app, "admins", "remove", ADMIN_EMAIL).exit_code == 0
    last = run(app, "admins", "remove", "ops@example.com")
    assert last.exit_code == 1 and "is the last admin" in last.output
    demote = run(app, "admins", "role", "ops@example.com", "viewer")
    assert demote.exit_code == 1 and "is the last admin" in demote.output
    wrong = run(app, "admins", "role", "ops@example.com", "root")
    assert wrong.exit_code == 2 and "'root' is not one of" in wrong.output
    actions = [e["action"] for e in app.extensions["blynkota.audit"].page(0, 20)[0]]
    assert actions[:3] == ["set role", "remove admin", "remove admin"]  # refused ones too
    assert "long-enough" not in str(app.extensions["blynkota.audit"].page(0, 20)[0])
