"""Entry point: `python wsgi.py [-serverConfig FILE] [-dataFolder DIR]` runs the server.

`flask --app wsgi ...` finds `create_app` here for the operator commands.
"""

if __name__ == "__main__":
    # Before anything imports socket: PyMySQL's queries must yield to the hub.
    from gevent import monkey

    monkey.patch_all()

import argparse
import logging
import os
import sys

from blynkota import create_app
from blynkota.config import ConfigError

__all__ = ["create_app", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="blynkota OTA server")
    # Blynk's own flags, spelled as the Blynk server spells them.
    parser.add_argument("-serverConfig", help="server.properties file (as BLYNKOTA_CONFIG)")
    parser.add_argument("-dataFolder", help="data folder (as data.folder)")
    arguments = parser.parse_args(argv)
    if arguments.serverConfig:
        os.environ["BLYNKOTA_CONFIG"] = arguments.serverConfig
    overrides = {"data.folder": arguments.dataFolder} if arguments.dataFolder else None
    try:
        app = create_app(overrides)
    except ConfigError as error:
        print(f"blynkota: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=app.config["SETTINGS"].log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from blynkota.runner import BlynkotaServer

    BlynkotaServer(app).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
