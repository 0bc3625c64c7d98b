"""blynkota: an over-the-air firmware update server for Blynk devices."""

from .app import create_app

__all__ = ["create_app"]
