"""gevent's monkey patching, as every entry point runs it first.

Imports nothing but gevent and the standard library: it runs before Flask,
SQLAlchemy, PyMySQL or ssl are imported, so that they get the patched modules.
"""

from importlib import metadata

__all__ = ["patch_for_gevent"]


def patch_for_gevent() -> None:
    """`gevent.monkey.patch_all()`, with one read of the installed packages' entry points.

    gevent looks for plugins at each of the two dozen events of a patch_all,
    and each lookup reads the entry points of every installed distribution
    again: about 0.25 s of a process's start with 140 of them installed (a
    device worker, a CLI command, each of the test suite's servers). One
    read serves every event; plugins are found as before.
    """
    from gevent import monkey

    installed = metadata.entry_points()
    lookup = metadata.entry_points
    metadata.entry_points = lambda **selection: installed.select(**selection)
    try:
        monkey.patch_all()
    finally:
        metadata.entry_points = lookup
