"""The Alembic migrations: one head, in step with the models, reversible, on SQLite and MySQL."""

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
