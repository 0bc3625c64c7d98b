"""Alembic environment: the URL comes from the blynkota settings, never from alembic.ini."""

import sys
from logging.config import fileConfig

from alembic import context
from sqlalchemy.exc import DBAPIError

from blynkota.config import load_settings
from blynkota.store import records  # noqa: F401 (its tables join the metadata)
from blynkota.store.db import connection_problem, make_engine
from blynkota.store.models import Base

config = context.config
if config.config_file_name is not None and not config.attributes.get("db_url"):
    # Run from the `alembic` command: log as alembic.ini says.
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _database_url() -> str:
    return (
        config.attributes.get("db_url")
        or context.get_x_argument(as_dictionary=True).get("db_url")
        or load_settings().db_url
    )


def _ensure_sqlite_folder(url: str) -> None:
    if url.startswith("sqlite:///"):
        from pathlib import Path

        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def run_migrations_offline() -> None:
    context.configure(
        url=_database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = _database_url()
    _ensure_sqlite_folder(url)
    engine = make_engine(url)
    try:
        connection = engine.connect()
    except DBAPIError as error:
        problem = connection_problem(url, error)
        if problem is None or config.attributes.get("db_url"):
            raise  # blynkota's own upgrade (store/migrate.py) says it its way
        print(f"alembic: {problem}", file=sys.stderr)  # the `alembic` command: one line
        sys.exit(2)
    with connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
