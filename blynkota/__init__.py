"""blynkota: an over-the-air firmware update server for Blynk devices.

Importing the package imports nothing else: the `blynkota` command and the
device workers patch the standard library for gevent before Flask,
SQLAlchemy or ssl are loaded.
"""

__all__ = ["create_app"]


def create_app(config=None):
    """The Flask app (blynkota/app.py); see there."""
    from .app import create_app as build

    return build(config)
