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

    Greenlets do not record who spawned them: gevent's greenlet tree keeps
    each new greenlet's spawning stack, line numbers and all, which was 4 %
    of the instructions of a login storm (a greenlet per connection), for a
    debugging aid nothing here reads.
    """
    import gevent
    from gevent import monkey

    gevent.config.track_greenlet_tree = False

    installed = metadata.entry_points()
    lookup = metadata.entry_points
    metadata.entry_points = lambda **selection: installed.select(**selection)
    try:
        monkey.patch_all()
    finally:
        metadata.entry_points = lookup
