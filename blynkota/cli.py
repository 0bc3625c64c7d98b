"""Operator commands: `flask --app wsgi devices add|list`, `flask --app wsgi import-blynk`."""

from pathlib import Path

import click
from flask import Flask, current_app
from flask.cli import AppGroup, with_appcontext

from .ota import BlynkDataError, ProvisioningError, read_blynk_folder
from .store import upgrade

__all__ = ["init_app"]


def _fleet():
    # The schema is brought up to date first, so these work before the first server start.
    upgrade(current_app.config["SETTINGS"].db_url)
    return current_app.extensions["blynkota.fleet"]


@click.group("devices", cls=AppGroup, help="Provision and list devices.")
def devices() -> None:
    pass


@devices.command("add")
@click.option("--user", "email", required=True, help="Owner's email (created if new).")
@click.option("--project", required=True, help="Project name (created if new).")
@click.option("--name", default="", help="Device name.")
@click.option("--token", default=None, help="32-character token (random when omitted).")
def add_device(email: str, project: str, name: str, token: str | None) -> None:
    """Add a device and print its token."""
    try:
        click.echo(_fleet().add_device(email, project, name=name, token=token))
    except ProvisioningError as error:
        raise click.ClickException(str(error)) from None


@devices.command("list")
def list_devices() -> None:
    """Print token, user, project, last build and whether it is online."""
    rows = _fleet().list_devices()
    table = [("TOKEN", "USER", "PROJECT", "BUILD", "ONLINE")] + [
        (row.token, row.user, row.project, row.build or "-", "yes" if row.online else "no")
        for row in rows
    ]
    widths = [max(len(line[column]) for line in table) for column in range(5)]
    for line in table:
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        click.echo("  ".join(cells).rstrip())


@click.command("import-blynk")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@with_appcontext
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


def init_app(app: Flask) -> None:
    app.cli.add_command(devices)
    app.cli.add_command(import_blynk)
