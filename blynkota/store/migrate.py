"""Run the Alembic migrations from code (server start, tests) with an explicit URL."""

from alembic import command
from alembic.config import Config

from ..config import PROJECT_ROOT

__all__ = ["alembic_config", "upgrade"]


def alembic_config(db_url: str) -> Config:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    config.attributes["db_url"] = db_url
    return config


def upgrade(db_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(db_url), revision)
