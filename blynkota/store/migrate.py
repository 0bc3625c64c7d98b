"""Run the Alembic migrations from code (server start, tests) with an explicit URL."""

from pathlib import Path

from alembic import command
from alembic.config import Config

from ..config import IN_CHECKOUT, PROJECT_ROOT

__all__ = ["alembic_config", "migrations_folder", "upgrade"]


def migrations_folder() -> Path:
    """The checkout's migrations/, or the copy `pip install` put inside the package."""
    if IN_CHECKOUT:
        return PROJECT_ROOT / "migrations"
    return Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(db_url: str) -> Config:
    config = Config(str(PROJECT_ROOT / "alembic.ini")) if IN_CHECKOUT else Config()
    config.set_main_option("script_location", str(migrations_folder()))
    config.attributes["db_url"] = db_url
    return config


def upgrade(db_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(db_url), revision)
