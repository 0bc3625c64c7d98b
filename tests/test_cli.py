"""Operator commands through Flask's CLI runner: provisioning and the Blynk import."""

import json

import pytest
import sqlalchemy

from blynkota.logsafe import token_tag


def run(app, *arguments):
    result = app.test_cli_runner().invoke(args=list(arguments))
    return result


def test_devices_add_prints_a_token_and_list_shows_it(app):
    given = run(app, "devices", "add", "--user", "me@example.com", "--project", "Farm",
                "--name", "pump", "--token", "0123456789abcdef0123456789abcdef")  # fmt: skip
    assert given.exit_code == 0 and given.output == "0123456789abcdef0123456789abcdef\n"
    random = run(app, "devices", "add", "--user", "me@example.com", "--project", "farm")
    token = random.output.strip()
    assert len(token) == 32 and token.isalnum() and token != given.output.strip()
    listing = run(app, "devices", "list").output.splitlines()
    assert listing[0].split() == [
        "TOKEN", "USER", "PROJECT", "BUILD", "FW", "VERSION", "FW", "TYPE", "LIBRARY",
        "ONLINE", "TAGS", "LOG", "TAG",
    ]  # fmt: skip
    unreported = ["-", "-", "-", "-"]  # build, firmware version and type, library
    assert sorted(line.split() for line in listing[1:]) == sorted(
        [  # fmt: skip
            [
                "0123456789abcdef0123456789abcdef",
                "me@example.com",
                "Farm",
                *unreported,
                "no",
                "-",
                token_tag("0123456789abcdef0123456789abcdef"),
            ],
            [token, "me@example.com", "Farm", *unreported, "no", "-", token_tag(token)],  # any case
        ]
    )


def test_devices_add_refuses_a_taken_token(app):
    token = "abc123" + "0" * 26
    arguments = ["devices", "add", "--user", "a@b.c", "--project", "P", "--token", token]
    assert run(app, *arguments).exit_code == 0
    again = run(app, *arguments)
    assert again.exit_code != 0 and "already belongs" in again.output


@pytest.mark.parametrize("token", ["abc", "a" * 31, "a" * 33, "a" * 31 + "!", "a" * 31 + "é"])
def test_every_provisioning_path_checks_the_token(app, tmp_path, token):
    """32 characters of the token alphabet: `abc` is a typo, refused with the rule."""
    rule = "A token is 32 characters: letters, digits, '-' or '_'."
    added = run(app, "devices", "add", "--user", "a@b.c", "--project", "P", "--token", token)
    assert added.exit_code != 0 and rule in added.output
    rows = tmp_path / "devices.csv"
    rows.write_text(f"token,user,project,name\n{'b' * 32},a@b.c,P,ok\n{token},a@b.c,P,x\n")
    imported = run(app, "devices", "import-csv", str(rows))
    assert imported.exit_code != 0 and f"device 2: {rule}" in imported.output
    folder = tmp_path / "blynk-data"
    folder.mkdir()
    write_user(folder, "u_c@example.com.user", blynk_user("c@example.com", [
        {"id": 1, "name": "G", "devices": [{"id": 0, "token": token}]}]))  # fmt: skip
    blynk = run(app, "import-blynk", str(folder))
    assert blynk.exit_code != 0
    assert "u_c@example.com.user: dashboard 1 has a token that is not 32 characters" in (
        blynk.output
    )
    with app.extensions["blynkota.db"].engine.connect() as connection:
        assert connection.execute(sqlalchemy.text("SELECT count(*) FROM devices")).scalar() == 0


def write_user(folder, name, document):
    (folder / name).write_text(json.dumps(document))


def blynk_user(email, dashboards, **extra):
    return {"email": email, "profile": {"dashBoards": dashboards}, **extra}


def test_import_blynk_keeps_tokens_and_never_duplicates(app, tmp_path):
    folder = tmp_path / "blynk-data"
    folder.mkdir()
    write_user(folder, "u_alice@example.com.user", blynk_user("alice@example.com", [
        {"id": 100, "name": "Garden", "devices": [
            {"id": 0, "token": "a" * 32, "boardType": "ESP8266", "name": "valve"},
            {"id": 1, "token": "b" * 32, "boardType": "ESP32"},
        ]},
        {"id": 200, "name": None, "devices": [{"id": 0, "token": "c" * 32}]},
    ]))  # fmt: skip
    # An old file: no devices, one token per dashboard; email from the file name.
    write_user(folder, "bob@example.com.Blynk.user", {
        "profile": {"dashBoards": [{"id": 7, "name": "Old", "boardType": "ESP8266"}]},
        "dashTokens": {"7": "d" * 32},
    })  # fmt: skip
    first = run(app, "import-blynk", str(folder))
    assert first.exit_code == 0, first.output
    assert "2 new user(s), 3 new project(s), 4 new device(s)" in first.output
    second = run(app, "import-blynk", str(folder))
    # Run again, it fills in only what changed: nothing here.
    assert "0 new user(s), 0 new project(s), 0 new device(s), 0 device(s) updated" in second.output

    with app.extensions["blynkota.db"].engine.connect() as connection:
        found = connection.execute(sqlalchemy.text(
            "SELECT u.email, p.dash_id, p.name, d.blynk_id, d.token, d.board_type, d.name "
            "FROM devices d JOIN projects p ON p.id = d.project_id "
            "JOIN users u ON u.id = p.user_id ORDER BY d.token"
        )).all()  # fmt: skip
    assert [tuple(row) for row in found] == [
        ("alice@example.com", 100, "Garden", 0, "a" * 32, "ESP8266", "valve"),
        ("alice@example.com", 100, "Garden", 1, "b" * 32, "ESP32", ""),
        ("alice@example.com", 200, "", 0, "c" * 32, None, ""),
        ("bob@example.com", 7, "Old", 0, "d" * 32, "ESP8266", ""),
    ]


def test_import_the_real_blynk_user_file(app, shared_dir):
    result = run(app, "import-blynk", str(shared_dir / "fixtures" / "blynk-data"))
    assert result.exit_code == 0, result.output
    assert "1 new user(s), 5 new project(s), 5 new device(s)" in result.output
    listing = run(app, "devices", "list").output
    assert "4ae3851817194e2596cf1b7103603ef8  dmitriy@blynk.cc  New Project" in listing


@pytest.mark.parametrize("content", ["not json", "[1, 2]"])
def test_import_reports_an_unreadable_file(app, tmp_path, content):
    (tmp_path / "broken.user").write_text(content)
    result = run(app, "import-blynk", str(tmp_path))
    assert result.exit_code != 0 and "broken.user: not a Blynk user file" in result.output
