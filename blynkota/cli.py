"""Operator commands on the database, no server needed: `devices add|list|import-csv|
export-csv`, `import-blynk`, `ota status`.

The same commands serve `flask --app wsgi ...` and `blynkota ...` (console.py).
"""

import csv
import functools
import getpass
import os
from collections.abc import Callable
from pathlib import Path

import click
from flask import Flask, current_app
from flask.cli import AppGroup, ScriptInfo, with_appcontext
from sqlalchemy.exc import DBAPIError

from .ota import (
    BlynkDataError,
    DeviceFilter,
    NewDevice,
    OtaError,
    ProvisioningError,
    check_tag,
    read_blynk_folder,
)
from .status_text import render, table
from .store import AdminRole, connection_problem, upgrade

__all__ = ["admins", "devices", "import_blynk", "init_app"]


def _fleet():
    # The schema is brought up to date first, so these work before the first server start.
    upgrade(current_app.config["SETTINGS"].db_url)
    return current_app.extensions["blynkota.fleet"]


class DatabaseUnusable(click.ClickException):
    """The database cannot be used at all: one line, exit 2, as a wrong setting."""

    exit_code = 2


class _OneLineDatabaseErrors:
    """A command whose database cannot be reached, or refuses the login, says so
    in one line naming the database, its host and the cause (no traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DBAPIError as error:
            url = ctx.ensure_object(ScriptInfo).load_app().config["SETTINGS"].db_url
            problem = connection_problem(url, error)
            if problem is None:
                raise
            raise DatabaseUnusable(problem) from None


class DatabaseGroup(_OneLineDatabaseErrors, AppGroup):
    pass


class DatabaseCommand(_OneLineDatabaseErrors, click.Command):
    pass


def audited(action: str, described: Callable[..., str]):
    """The command writes an audit entry (ota/fleet/audit.py): done (200) or
    refused (400), by the command line's user; `described` says what, from its
    arguments (never a token, never a password)."""

    def wrap(command):
        @functools.wraps(command)
        def run(*args, **kwargs):
            status = 400
            try:
                result = command(*args, **kwargs)
                status = 200
                return result
            finally:
                current_app.extensions["blynkota.audit"].record(
                    admin=f"command line ({_os_user()})",
                    address="command line",
                    action=action,
                    status=status,
                    detail=described(**kwargs),
                )

        return run

    return wrap


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for the process's user (a container)
        return str(os.getuid())


@click.group("devices", cls=DatabaseGroup, help="Provision and list devices.")
def devices() -> None:
    pass


@devices.command("add")
@click.option("--user", "email", required=True, help="Owner's email (created if new).")
@click.option("--project", required=True, help="Project name (created if new).")
@click.option("--name", default="", help="Device name.")
@click.option("--token", default=None, help="32-character token (random when omitted).")
@audited("add device", lambda email, project, name, token: f"{email} / {project} {name}".strip())
def add_device(email: str, project: str, name: str, token: str | None) -> None:
    """Add a device and print its token."""
    try:
        click.echo(_fleet().add_device(email, project, name=name, token=token))
    except ProvisioningError as error:
        raise click.ClickException(str(error)) from None


@devices.command("tag")
@click.argument("tag")
@click.argument("devices", nargs=-1, required=True)
@click.option("--remove", is_flag=True, help="take the tag off instead")
@audited("tag devices", lambda tag, devices, remove: f"{'-' if remove else '+'}{tag}")
def tag_devices(tag: str, devices: tuple[str, ...], remove: bool) -> None:
    """Put TAG on DEVICES (tokens or device names), or take it off (--remove)."""
    try:
        changed, unknown = _fleet().tag_devices(tag, list(devices), remove=remove)
    except ProvisioningError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"{'Untagged' if remove else 'Tagged'} {changed} device(s).")
    if unknown:
        raise click.ClickException(f"no device is {', '.join(unknown[:5])}")


@devices.command("list")
@click.option("--tag", help="only the devices carrying this tag")
@click.option("--search", help="a token's start, a log tag, or part of a name, user, build…")
def list_devices(tag: str | None, search: str | None) -> None:
    """Print token, user, project, what the device last reported (build, firmware
    version and type, library version), whether it is online, its tags and its tag
    in the log."""
    rows = _fleet().list_devices(DeviceFilter(search=search, tag=tag))
    click.echo(
        table(
            [
                (
                    "TOKEN",
                    "USER",
                    "PROJECT",
                    "BUILD",
                    "FW VERSION",
                    "FW TYPE",
                    "LIBRARY",
                    "ONLINE",
                    "TAGS",
                    "LOG TAG",
                )
            ]
            + [
                (
                    row.token,
                    row.user,
                    row.project,
                    row.build or "-",
                    row.fw_version or "-",
                    row.fw_type or "-",
                    row.lib_version or "-",
                    "yes" if row.online else "no",
                    ",".join(row.tags) or "-",
                    row.tag,
                )
                for row in rows
            ]
        )
    )


CSV_COLUMNS = ("token", "user", "project", "name")
EXPORT_COLUMNS = (
    *CSV_COLUMNS,
    "build",
    "online",
    "last_seen_at",
    "fw_version",
    "fw_type",
    "lib_version",
    "tags",
)
CSV_MAX_ROWS = 1_000_000


def _csv_devices(path: Path) -> tuple[list[NewDevice], list[tuple[str, ...]]]:
    """Rows of `token,user,project,name[,tags]` (a header line names them; token
    may be empty; tags, space-separated), and each row's tags."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = {"user", "project"} - set(reader.fieldnames or ())
            if missing:
                raise click.ClickException(
                    f"{path}: the header line needs the columns {', '.join(CSV_COLUMNS)} "
                    f"(token and name may be empty); missing: {', '.join(sorted(missing))}"
                )
            devices, tags = [], []
            for row in reader:
                if len(devices) >= CSV_MAX_ROWS:
                    raise click.ClickException(f"{path}: more than {CSV_MAX_ROWS} rows")
                devices.append(
                    NewDevice(
                        email=(row.get("user") or "").strip(),
                        project=(row.get("project") or "").strip(),
                        name=(row.get("name") or "").strip(),
                        token=(row.get("token") or "").strip() or None,
                    )
                )
                try:
                    tags.append(tuple(check_tag(t) for t in (row.get("tags") or "").split()))
                except ProvisioningError as error:
                    raise click.ClickException(f"{path}: row {len(devices)}: {error}") from None
            return devices, tags
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise click.ClickException(f"{path}: cannot read it ({error})") from None


@devices.command("import-csv")
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@audited("import csv", lambda csv_file: str(csv_file))
def import_csv(csv_file: Path) -> None:
    """Add the devices of a CSV file (token,user,project,name), all or none."""
    rows, tags = _csv_devices(csv_file)
    try:
        tokens = _fleet().add_devices(rows)
    except ProvisioningError as error:
        # Devices count from the first line after the header.
        raise click.ClickException(f"{csv_file}: nothing added: {error}") from None
    tagged: dict[str, list[str]] = {}
    for token, row_tags in zip(tokens, tags, strict=True):
        for tag in row_tags:
            tagged.setdefault(tag, []).append(token)
    for tag, members in tagged.items():
        _fleet().tag_devices(tag, members)
    generated = sum(row.token is None for row in rows)
    click.echo(
        f"Added {len(tokens)} device(s), {generated} with a new token "
        "(devices export-csv lists them with their tokens)."
    )


@devices.command("export-csv")
@click.argument("csv_file", type=click.File("w", encoding="utf-8"), default="-")
def export_csv(csv_file) -> None:
    """Write every device as CSV (to CSV_FILE, or standard output); import-csv reads it back."""
    writer = csv.writer(csv_file, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    for row in _fleet().list_devices():
        writer.writerow(
            (
                row.token,
                row.user,
                row.project,
                row.name,
                row.build or "",
                "yes" if row.online else "no",
                row.last_seen_at.isoformat() + "Z" if row.last_seen_at else "",
                row.fw_version or "",
                row.fw_type or "",
                row.lib_version or "",
                " ".join(row.tags),
            )
        )


@click.command("import-blynk", cls=DatabaseCommand)
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@with_appcontext
@audited("import blynk", lambda data_dir: str(data_dir))
def import_blynk(data_dir: Path) -> None:
    """Import users, projects and device tokens from a Blynk server's data folder."""
    try:
        users = read_blynk_folder(data_dir)
    except BlynkDataError as error:
        raise click.ClickException(str(error)) from None
    counts = _fleet().import_blynk(users)
    click.echo(
        f"Imported {len(users)} user file(s): {counts.users} new user(s), "
        f"{counts.projects} new project(s), {counts.devices} new device(s), "
        f"{counts.updated} device(s) updated."
    )


@click.group("ota", cls=DatabaseGroup, help="Look at rollouts.")
def ota() -> None:
    pass


@ota.command("status")
@click.argument("rollout", type=int, required=False)
def ota_status(rollout: int | None) -> None:
    """Every rollout with its counts; with ROLLOUT, that one's devices."""
    upgrade(current_app.config["SETTINGS"].db_url)
    service = current_app.extensions["blynkota"].admin
    try:
        summaries = [service.detail(rollout)] if rollout is not None else service.status()
    except OtaError as error:
        raise click.ClickException(str(error)) from None
    click.echo(render(summaries))


@click.group("admins", cls=DatabaseGroup, help="Admin accounts and their roles.")
def admins() -> None:
    pass


def _admins():
    upgrade(current_app.config["SETTINGS"].db_url)
    return current_app.extensions["blynkota.admins"]


_ROLE = click.Choice(AdminRole.ALL)


@admins.command("add")
@click.argument("email")
@click.option("--role", type=_ROLE, default=AdminRole.VIEWER, show_default=True)
@click.password_option(help="at least 8 characters (asked for when not given)")
@audited("add admin", lambda email, role, password: f"{email} as {role}")
def add_admin(email: str, role: str, password: str) -> None:
    """Add an account: viewers read, operators also steer rollouts, admins also
    delete devices and firmware."""
    try:
        _admins().add(email, password, role)
    except ProvisioningError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"Added {email} as {role}.")


@admins.command("list")
def list_admins() -> None:
    """Every account and its role."""
    click.echo(table([("EMAIL", "ROLE"), *_admins().accounts()]))


@admins.command("role")
@click.argument("email")
@click.argument("role", type=_ROLE)
@audited("set role", lambda email, role: f"{email} to {role}")
def set_role(email: str, role: str) -> None:
    """Give an account another role (the last admin keeps its own)."""
    try:
        _admins().set_role(email, role)
    except ProvisioningError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"{email} is {role} now.")


@admins.command("remove")
@click.argument("email")
@audited("remove admin", lambda email: email)
def remove_admin(email: str) -> None:
    """Remove an account (never the last admin; admin.email comes back at the next start)."""
    try:
        _admins().remove(email)
    except ProvisioningError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"Removed {email}.")


def init_app(app: Flask) -> None:
    app.cli.add_command(admins)
    app.cli.add_command(devices)
    app.cli.add_command(import_blynk)
    app.cli.add_command(ota)
