"""README's SQL and CI's command: what the README tells operators must keep working."""

import re
import subprocess

import sqlalchemy

from .devices import BUILD_NEW, TOKEN
from .images import esp8266_image
from .servers import ROOT, wait_until

README = (ROOT / "README.md").read_text()


def test_the_history_queries_run_and_find_the_rollout(server, simulated, fleet, app):
    fleet.add_device("me@example.com", "Farm", token=TOKEN)
    device = simulated(TOKEN, "Jan  1 2018 00:00:00", fail="refuse")
    wait_until(device.ready.is_set)
    server.upload("/admin/ota/start", esp8266_image(BUILD_NEW))
    server.upload(f"/admin/ota/start?token={TOKEN}", esp8266_image(BUILD_NEW))
    wait_until(lambda: device.ota_urls)

    history = README.split("## History in SQL", 1)[1]
    block = re.findall(r"```sql\n(.*?)```", history, re.S)[0]
    statements = [s.strip() for s in block.split(";") if s.strip()]
    assert len(statements) == 7
    with app.extensions["blynkota.db"].engine.connect() as connection:
        results = [connection.execute(sqlalchemy.text(s)).all() for s in statements]
    progress, rollouts, behind, failures, times, story, commands = results
    assert [row[0] for row in progress] == [row[0] for row in rollouts]
    assert [row[1] for row in rollouts] == ["device", "all"]
    assert [(row[0], row[3]) for row in behind] == [(TOKEN, "offered")]
    assert failures == [] and times == []
    assert [(row[2], row[3]) for row in story] == [(None, "pending"), ("pending", "offered")]
    assert [row[1] for row in commands] == [BUILD_NEW]


def test_ci_runs_the_readme_test_command():
    """.ci/run's own extraction line, run here, finds the README's test command."""
    (line,) = [
        line for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.startswith("command=")
    ]  # fmt: skip
    found = subprocess.run(
        ["bash", "-c", f'{line}; printf "%s" "$command"'],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert found.stdout == "pip install -r requirements.txt && python -m pytest -q -n 2"
    assert found.stdout in README


def test_the_scale_out_presence_query_runs(server, app):
    """README's "who is where" query, on a running node."""
    scaling = README.split("## Scaling out", 1)[1].split("\n## ", 1)[0]
    (query,) = re.findall(r"```sql\n(.*?)```", scaling, re.S)
    with app.extensions["blynkota.db"].engine.connect() as connection:
        rows = connection.execute(sqlalchemy.text(query.strip().rstrip(";"))).all()
    assert [(row[2], row[3]) for row in rows] == [(None, 0)]  # one live node, no device yet
