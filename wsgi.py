"""Entry point for every process type (see blynkota/serving.py).

- `python wsgi.py [-serverConfig FILE] [-dataFolder DIR]`: the whole server in
  one process (devices, downloads, admin API): the embedded default, on SQLite.
- `python wsgi.py devices [--workers N]`: the device port only (devices and
  firmware downloads), as N processes sharing the port with SO_REUSEPORT.
- `gunicorn -k gevent wsgi:app`: the admin API and firmware downloads as a WSGI app.
- `flask --app wsgi ...` finds `create_app` here for the operator commands.
"""

if __name__ == "__main__":
    # Before anything imports socket: PyMySQL's queries must yield to the hub.
    from blynkota.patching import patch_for_gevent

    patch_for_gevent()

import sys

from blynkota.app import create_app_for_commands as create_app  # for `flask --app wsgi`
from blynkota.serving import app, load_for_gunicorn, main

__all__ = ["app", "create_app", "main"]

if "gunicorn" in sys.modules and __name__ != "__main__":
    load_for_gunicorn()

if __name__ == "__main__":
    sys.exit(main())
