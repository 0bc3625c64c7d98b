"""The Alembic migrations: one head, in step with the models, reversible, on SQLite and MySQL."""

import pytest
import sqlalchemy
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from blynkota.store import Base, alembic_config, make_engine, upgrade


def test_there_is_one_head(db_url):
    assert len(ScriptDirectory.from_config(alembic_config(db_url)).get_heads()) == 1


def test_models_and_migrations_agree(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "render_as_batch": True}
        )
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_downgrade_then_upgrade(db_url):
    config = alembic_config(db_url)
    command.upgrade(config, "head")
    command.downgrade(config, "base")
    engine = make_engine(db_url)
    assert set(sqlalchemy.inspect(engine).get_table_names()) <= {"alembic_version"}
    command.upgrade(config, "head")
    tables = set(sqlalchemy.inspect(engine).get_table_names())
    assert {"users", "projects", "devices", "admins", "firmware", "rollouts", "ota_commands"} <= (
        tables
    )
    engine.dispose()


def _insert(connection, table: str, **values) -> int:
    columns = ", ".join(values)
    marks = ", ".join(f":{key}" for key in values)
    connection.execute(sqlalchemy.text(f"INSERT INTO {table} ({columns}) VALUES ({marks})"), values)
    return connection.execute(sqlalchemy.text(f"SELECT max(id) FROM {table}")).scalar_one()


def test_upgrading_a_database_that_holds_data_keeps_every_row(db_url):
    config = alembic_config(db_url)
    command.upgrade(config, "0001")
    engine = make_engine(db_url)
    now = "2026-01-02 03:04:05"
    with engine.begin() as connection:
        user = _insert(connection, "users", email="old@example.com", created_at=now)
        project = _insert(connection, "projects", user_id=user, dash_id=7, name="Farm",
                          created_at=now)  # fmt: skip
        device = _insert(connection, "devices", project_id=project, name="pump", token="a" * 32,
                         build="Jan  1 2018 00:00:00", created_at=now)  # fmt: skip
        firmware = _insert(connection, "firmware", name="0" * 24, original_name="fw.bin", size=10,
                           md5="m", sha256="s", build="Nov 29 2018 12:00:00", uploaded_by="a",
                           uploaded_at=now)  # fmt: skip
        rollout = _insert(connection, "rollouts", scope="all", firmware_id=firmware,
                          state="active", started_at=now, started_by="a")  # fmt: skip
        _insert(connection, "ota_commands", device_id=device, firmware_id=firmware,
                rollout_id=rollout, url="http://x/static/ota/0.bin", sent_at=now)  # fmt: skip
    command.upgrade(config, "head")
    with engine.connect() as connection:

        def rows(sql):
            return [tuple(row) for row in connection.execute(sqlalchemy.text(sql))]

        assert rows("SELECT email FROM users") == [("old@example.com",)]
        assert rows("SELECT token, build FROM devices") == [("a" * 32, "Jan  1 2018 00:00:00")]
        assert rows("SELECT scope, state FROM rollouts") == [("all", "active")]
        assert rows("SELECT url, offer_key FROM ota_commands") == [
            ("http://x/static/ota/0.bin", None)
        ]
        # The old rollout shows in the progress view, with no device tracked yet.
        assert rows("SELECT rollout_id, devices FROM rollout_progress") == [(rollout, 0)]
    engine.dispose()


@pytest.mark.mysql
def test_every_table_holds_any_unicode_on_a_latin1_mysql_server(latin1_mysql_url):
    upgrade(latin1_mysql_url)
    engine = make_engine(latin1_mysql_url)
    rocket = "build \U0001f680 \u00b2"
    with engine.begin() as connection:
        latin1_columns = connection.execute(
            sqlalchemy.text(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = DATABASE() AND character_set_name IS NOT NULL "
                "AND character_set_name <> 'utf8mb4'"
            )
        ).all()
        assert latin1_columns == []
        connection.execute(
            sqlalchemy.text("INSERT INTO users (email, created_at) VALUES ('a@b.c', NOW())")
        )
        connection.execute(
            sqlalchemy.text(
                "INSERT INTO projects (user_id, dash_id, name, created_at) "
                "SELECT id, 1, :name, NOW() FROM users"
            ),
            {"name": rocket},
        )
        stored = connection.scalar(sqlalchemy.text("SELECT name FROM projects"))
    assert stored == rocket
    engine.dispose()


def _schema(url: str) -> dict[str, object]:
    """Every table's and view's definition and every table's rows, by name, with
    the database's own name taken out of the views."""
    engine = sqlalchemy.create_engine(url)
    name = engine.url.database
    found = {}
    with engine.connect() as connection:
        kinds = connection.exec_driver_sql(
            "SELECT table_name, table_type FROM information_schema.tables "
            f"WHERE table_schema = '{name}'"
        ).all()
        for table, kind in kinds:
            if kind == "VIEW":
                ddl = connection.exec_driver_sql(f"SHOW CREATE VIEW {table}").one()[1]
                found[table] = ddl.replace(f"`{name}`.", "")
            else:
                ddl = connection.exec_driver_sql(f"SHOW CREATE TABLE {table}").one()[1]
                rows = connection.exec_driver_sql(f"SELECT * FROM {table}").all()
                found[table] = (ddl, sorted(map(tuple, rows)))
    engine.dispose()
    return found


@pytest.mark.mysql
def test_the_tests_copy_of_a_migrated_mysql_database_is_the_migrated_database(mysql_url):
    """conftest copies one migrated database for the tests that want one
    (TEMPLATES): tables, keys, rows and views equal a migration's own."""
    from .conftest import TEMPLATES, _mysql_database

    with _mysql_database() as copy_url:
        TEMPLATES.copy_to(copy_url)
        upgrade(mysql_url)
        migrated, copied = _schema(mysql_url), _schema(copy_url)
    assert "rollout_progress" in migrated and "alembic_version" in migrated
    assert copied == migrated
