"""`python -m tests.server.run_test_server --base-dir D --port P`: the server with the pure test
registry in its own process, for the restart tests (which kill it with SIGKILL)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from aiohttp import web

from server.app import create_app
from server.settings import Settings

from .servernodes import make_registry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings(base_dir=Path(args.base_dir), port=args.port, demo_files=False, frontend=False, plugins=False)
    web.run_app(create_app(settings, registry=make_registry()), host="127.0.0.1", port=args.port, access_log=None)


if __name__ == "__main__":
    main()
