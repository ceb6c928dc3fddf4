"""create_app: the aiohttp application for a Daemon."""

from __future__ import annotations

from aiohttp import web

from autogentoo.daemon.api import load_all
from autogentoo.daemon.server import base_app
from autogentoo.daemon.service import DAEMON, Daemon


def create_app(daemon: Daemon) -> web.Application:
    router = load_all()
    app = base_app(router, lambda: daemon.config.policy, daemon.config.limits.max_json_body)
    app[DAEMON] = daemon
    return app
