"""The `blynkota` command (installed by `pip install .`).

- `blynkota serve`: the server, as `python wsgi.py`.
- `blynkota devices add|list|import-csv|export-csv|import-blynk`: provisioning,
  straight on the database (no server needed), as `flask --app wsgi devices`.
- `blynkota firmware upload` and `blynkota rollout status|pause|resume|stop|retry`:
  through a running server's admin API, so they work against a remote one.
"""

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    # Before Flask, SQLAlchemy or ssl are imported: the server and PyMySQL
    # need the standard library patched for gevent (a no-op for the rest).
    from ..patching import patch_for_gevent

    patch_for_gevent()
    from .commands import blynkota

    return blynkota.main(args=argv, prog_name="blynkota", standalone_mode=True)
