"""utf8mb4 for every table on MySQL, whatever the server's default charset

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 13:30:00

Tables created on a server whose default is latin1 or utf8 (3 bytes) refuse
an emoji in a reported build or an upload's file name ("Incorrect string
value"), and the device failed at every login. Every text column becomes
utf8mb4 (4-byte UTF-8). The collation is the server's utf8mb4 default
(case-insensitive, as the tables had), so unique tokens and e-mails compare
as before. SQLite stores UTF-8 already: there this revision changes nothing.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: Union[str, Sequence[str], None] = "0005"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def _convert(charset: str) -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    tables = inspector.get_table_names()
    # MariaDB refuses to convert a column a foreign key uses, even with the
    # checks off: those keys are dropped for the conversion and made again.
    text_keys = []
    for table in tables:
        text_columns = {
            column["name"]
            for column in inspector.get_columns(table)
            if isinstance(column["type"], sa.String)
        }
        for key in inspector.get_foreign_keys(table):
            if text_columns & set(key["constrained_columns"]):
                text_keys.append((table, key))
    for table, key in text_keys:
        op.drop_constraint(key["name"], table, type_="foreignkey")
    for table in tables:
        op.execute(f"ALTER TABLE `{table}` CONVERT TO CHARACTER SET {charset}")
    op.execute(f"ALTER DATABASE CHARACTER SET {charset}")
    for table, key in text_keys:
        op.create_foreign_key(
            key["name"],
            table,
            key["referred_table"],
            key["constrained_columns"],
            key["referred_columns"],
            **{option: value for option, value in key.get("options", {}).items()},
        )


def upgrade() -> None:
    if op.get_bind().dialect.name == "mysql":
        _convert("utf8mb4")


def downgrade() -> None:
    pass  # utf8mb4 holds everything the earlier charsets did: nothing to undo
