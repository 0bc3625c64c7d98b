"""The OpenAPI description (/admin/openapi.json) is true to the app, and no request
that it allows gets a 5xx: schemathesis sends generated ones to a running server."""

import base64
import re

import requests
import schemathesis
import urllib3
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import response_schema_conformance

from blynkota import create_app
from blynkota.web.openapi import OPENAPI

from .devices import BUILD_NEW
from .images import esp8266_image
from .servers import ADMIN_EMAIL, ADMIN_PASS

# Generated requests per operation: a bounded budget for CI.
EXAMPLES = 15


def _openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule)


def test_every_admin_route_is_described_and_nothing_else(tmp_path):
    app = create_app({"data.folder": tmp_path / "data"})
    routes = {}
    for rule in app.url_map.iter_rules():
        # The dashboard's pages are HTML for people, not the API.
        if rule.rule.startswith("/admin/") and not rule.endpoint.startswith("dashboard."):
            methods = {m.lower() for m in rule.methods} - {"head", "options"}
            routes.setdefault(_openapi_path(rule.rule), set()).update(methods)
    described = {path: set(operations) for path, operations in OPENAPI["paths"].items()}
    assert routes == described
    app.extensions["blynkota.db"].dispose()


def test_no_generated_request_gets_a_server_error(server, fleet):
    """Every operation, EXAMPLES generated requests each, against one server with
    a device and a rollout: none gets a 5xx, and every answer (a 200's JSON
    included) is the one its description promises."""
    fleet.add_device("me@example.com", "Farm")
    assert server.upload("/admin/ota/start", esp8266_image(BUILD_NEW)).status == 200
    served = server.admin("GET", "/admin/openapi.json")
    assert served.status == 200 and served.json() == OPENAPI
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    session = requests.Session()
    credentials = base64.b64encode(f"{ADMIN_EMAIL}:{ADMIN_PASS}".encode()).decode()
    base_url = f"https://127.0.0.1:{server.https_port}"
    errors = []
    sent = []

    def fuzz(operation) -> None:
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(operation.as_strategy())
        def check(case):
            response = case.call(
                base_url=base_url,
                session=session,
                headers={"Authorization": f"Basic {credentials}"},
                verify=False,  # the server's self-signed certificate
                timeout=30,
            )
            sent.append(operation.label)
            if response.status_code >= 500:
                errors.append((case.method, case.formatted_path, case.query, response.text[:200]))
            # The answer is the one described (raises, naming what differs).
            case.validate_response(response, checks=[response_schema_conformance])

        check()

    operations = [
        result.ok() for result in schemathesis.openapi.from_dict(OPENAPI).get_all_operations()
    ]
    for operation in operations:
        fuzz(operation)
    assert errors == []
    assert set(sent) == {operation.label for operation in operations}
    assert "Traceback" not in server.log()
