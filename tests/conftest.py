"""Fixtures: databases (SQLite always, MariaDB/MySQL when reachable), servers, fleets.

MySQL tests use BLYNKOTA_TEST_MYSQL_URL (default: root without password on
127.0.0.1:3306) and get a database of their own, dropped afterwards. Where no
server answers they skip with the reason; BLYNKOTA_REQUIRE_MYSQL=1 (set by CI)
turns that skip into a failure so CI can never silently lose them.
"""

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import gevent
import pytest
import sqlalchemy

from blynkota import create_app
from blynkota.store import upgrade

from .servers import ServerProcess

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
MYSQL_SERVER_URL = os.environ.get("BLYNKOTA_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/")


@contextlib.contextmanager
def tables_on(db_url: str, metadata: sqlalchemy.MetaData):
    """A Database on `db_url` holding a test's own tables, dropped afterwards."""
    from blynkota.store import Database

    database = Database(db_url)
    metadata.drop_all(database.engine)
    metadata.create_all(database.engine)
    try:
        yield database
    finally:
        metadata.drop_all(database.engine)
        database.dispose()


@pytest.fixture
def shared_dir() -> Path:
    if not (SHARED / "fixtures").is_dir():
        pytest.skip(f"{SHARED}/fixtures is not here (only beside the project checkout)")
    return SHARED


@contextlib.contextmanager
def _mysql_database(charset: str = "utf8mb4"):
    """A fresh database on the MySQL/MariaDB server, dropped afterwards; its URL."""
    server = sqlalchemy.create_engine(MYSQL_SERVER_URL)
    try:
        with server.connect() as connection:
            name = f"blynkota_test_{uuid.uuid4().hex[:10]}"
            connection.execute(sqlalchemy.text(f"CREATE DATABASE {name} CHARACTER SET {charset}"))
    except sqlalchemy.exc.OperationalError as error:
        server.dispose()
        reason = f"no MySQL/MariaDB at {MYSQL_SERVER_URL}: {error.orig}"
        if os.environ.get("BLYNKOTA_REQUIRE_MYSQL") == "1":
            pytest.fail(reason + " (BLYNKOTA_REQUIRE_MYSQL=1)")
        pytest.skip(reason)
    url = sqlalchemy.engine.make_url(MYSQL_SERVER_URL).set(
        database=name, query={"charset": "utf8mb4"}
    )
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with server.connect() as connection:
            connection.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name}"))
        server.dispose()


DATABASES = ["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)]


@contextlib.contextmanager
def _empty_database(kind: str, folder: Path):
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'blynkota.db'}"
        return
    with _mysql_database() as url:
        yield url


@pytest.fixture(params=DATABASES)
def db_url(request, tmp_path):
    """An empty database: a SQLite file, or a fresh database on MariaDB."""
    with _empty_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def mysql_url():
    """A fresh database on MariaDB/MySQL only (for what SQLite cannot do: many processes)."""
    with _mysql_database() as url:
        yield url


@pytest.fixture
def latin1_mysql_url():
    """A fresh MariaDB/MySQL database whose default charset is latin1, as old servers have."""
    with _mysql_database("latin1") as url:
        yield url


class _Templates:
    """One database migrated per run and kind, copied for each test that wants a
    migrated one: the migrations take 0.45 s on MariaDB (0.09 s on SQLite), a
    copy a third of it. Only the copy's speed differs: `upgrade` still runs on
    it (and would migrate it were it behind); test_migrations.py migrates from
    empty, and holds the copy to the migrated schema."""

    def __init__(self) -> None:
        self.sqlite: Path | None = None
        self.mysql: str | None = None
        self.folder: Path | None = None

    def copy_to(self, db_url: str) -> None:
        url = sqlalchemy.engine.make_url(db_url)
        if url.get_backend_name() == "sqlite":
            target = Path(url.database)
            if not target.exists():
                shutil.copyfile(self._sqlite(), target)
        elif url.get_backend_name() == "mysql":
            clone_mysql(self._mysql(), db_url)

    def _sqlite(self) -> Path:
        if self.sqlite is None:
            self.folder = Path(tempfile.mkdtemp(prefix="blynkota-template-"))
            self.sqlite = self.folder / "migrated.db"
            database_url = f"sqlite:///{self.sqlite}"
            upgrade(database_url)
            sqlalchemy.create_engine(database_url).dispose()  # its WAL folded back in
        return self.sqlite

    def _mysql(self) -> str:
        if self.mysql is None:
            self.mysql = f"blynkota_test_template_{uuid.uuid4().hex[:8]}"
            server = sqlalchemy.create_engine(MYSQL_SERVER_URL)
            with server.connect() as connection:
                connection.exec_driver_sql(f"CREATE DATABASE {self.mysql} CHARACTER SET utf8mb4")
            server.dispose()
            upgrade(_mysql_url_of(self.mysql))
        return self.mysql

    def drop(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        if self.mysql is not None:
            server = sqlalchemy.create_engine(MYSQL_SERVER_URL)
            with server.connect() as connection:
                connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {self.mysql}")
            server.dispose()


def _mysql_url_of(name: str) -> str:
    url = sqlalchemy.engine.make_url(MYSQL_SERVER_URL)
    return url.set(database=name, query={"charset": "utf8mb4"}).render_as_string(False)


def clone_mysql(template: str, db_url: str) -> None:
    """Make the database at `db_url` a copy of `template` (same server): its
    tables as SHOW CREATE TABLE gives them (keys, foreign keys, the
    AUTO_INCREMENT reached), their rows, and its views, read from the template.
    Only if it is still empty: a test's servers may have migrated it already."""
    engine = sqlalchemy.create_engine(db_url)
    try:
        with engine.connect() as connection:
            if connection.exec_driver_sql("SHOW TABLES").first() is not None:
                return
            connection.exec_driver_sql("SET FOREIGN_KEY_CHECKS=0")  # tables in any order
            objects = connection.exec_driver_sql(
                "SELECT table_name, table_type FROM information_schema.tables "
                f"WHERE table_schema = '{template}' ORDER BY table_name"
            ).all()
            for name, kind in objects:
                if kind == "BASE TABLE":
                    ddl = connection.exec_driver_sql(f"SHOW CREATE TABLE {template}.{name}")
                    connection.exec_driver_sql(ddl.one()[1])
                    connection.exec_driver_sql(
                        f"INSERT INTO {name} SELECT * FROM {template}.{name}"
                    )
            for name, kind in objects:
                if kind == "VIEW":
                    ddl = connection.exec_driver_sql(f"SHOW CREATE VIEW {template}.{name}")
                    connection.exec_driver_sql(ddl.one()[1].replace(f"`{template}`.", ""))
            connection.commit()
    finally:
        engine.dispose()


TEMPLATES = _Templates()


@pytest.fixture(scope="session", autouse=True)
def _templates_dropped():
    yield
    TEMPLATES.drop()


def _migrated_app(db_url: str, folder):
    TEMPLATES.copy_to(db_url)
    upgrade(db_url)
    # No health window, as the test servers (servers.py): test_health.py sets one.
    return create_app({"db.url": db_url, "data.folder": folder, "ota.health.window": 0})


@pytest.fixture
def app(db_url, tmp_path):
    """The Flask app on a migrated database, as the CLI and the tests' provisioning use it."""
    application = _migrated_app(db_url, tmp_path / "data")
    yield application
    application.extensions["blynkota.db"].dispose()


@pytest.fixture
def mysql_app(mysql_url, tmp_path):
    """The same on a MariaDB database only."""
    application = _migrated_app(mysql_url, tmp_path / "data")
    yield application
    application.extensions["blynkota.db"].dispose()


@pytest.fixture
def fleet(app):
    return app.extensions["blynkota.fleet"]


@pytest.fixture
def server_factory(db_url, tmp_path):
    started: list[ServerProcess] = []

    def start(**extra) -> ServerProcess:
        server = ServerProcess(tmp_path, db_url, **extra).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def port_server_factory(tmp_path):
    """Servers on SQLite alone, for what the database has no part in (HTTP and
    socket handling): the suite need not run those twice."""
    started: list[ServerProcess] = []

    def start(**extra) -> ServerProcess:
        server = ServerProcess(tmp_path, f"sqlite:///{tmp_path / 'port.db'}", **extra).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(server_factory, app):
    """A running server on the same database as `app` (whose fleet tests provision)."""
    return server_factory()


# --- one server for a whole module --------------------------------------------
#
# A server takes about a second to start. Tests that only read what they set
# up themselves (a download, a frame and its answer), and change nothing a
# neighbour reads, share one per module and database: `shared_server`, with
# `shared_app` and `shared_fleet` on its database. A test that reads the
# whole of a table, starts a campaign for every device, or needs its own
# settings takes `server` (a fresh database and server) instead.


@pytest.fixture(scope="module", params=DATABASES)
def shared_db_url(request, tmp_path_factory):
    with _empty_database(request.param, tmp_path_factory.mktemp("shared-db")) as url:
        yield url


@pytest.fixture(scope="module")
def shared_app(shared_db_url, tmp_path_factory):
    application = _migrated_app(shared_db_url, tmp_path_factory.mktemp("shared-data"))
    yield application
    application.extensions["blynkota.db"].dispose()


@pytest.fixture(scope="module")
def shared_fleet(shared_app):
    return shared_app.extensions["blynkota.fleet"]


@pytest.fixture(scope="module")
def shared_server(shared_db_url, shared_app, tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("shared-server"), shared_db_url).start()
    yield server
    server.stop()


@pytest.fixture
def simulated(server):
    """Start simulated devices against `server`; all are stopped in teardown."""
    from blynkota.simulator import SimulatedDevice

    running = []

    def start(token: str, build: str | None, **options) -> SimulatedDevice:
        device = SimulatedDevice("127.0.0.1", server.http_port, token, build, **options)
        running.append((device, device.start()))
        return device

    yield start
    for device, _ in running:
        device.stop()
    gevent.joinall([greenlet for _, greenlet in running], timeout=10)
