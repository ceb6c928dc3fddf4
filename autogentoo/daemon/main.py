"""autogentoo-daemon: the entry point."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from autogentoo import __version__
from autogentoo.daemon import config as config_mod
from autogentoo.daemon import log as log_mod
from autogentoo.daemon import service_manager as sd
from autogentoo.daemon.server import SocketInUse, bind_socket

log = logging.getLogger("autogentoo.daemon")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="autogentoo-daemon", description=__doc__)
    p.add_argument("--config", type=Path, help=f"config file (default {config_mod.DEFAULT_CONFIG})")
    p.add_argument("--socket", type=Path, help="serve this socket path (overrides the config)")
    p.add_argument("--debug", action="store_true", help="log debug messages")
    p.add_argument("--version", action="version", version=f"autogentoo {__version__}")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from autogentoo.daemon.app import create_app
    from autogentoo.daemon.server import serve
    from autogentoo.daemon.service import Daemon

    cfg = config_mod.load(args.config)
    if args.socket:
        cfg = replace(cfg, socket=args.socket)

    sock = sd.listen_socket()
    if sock is not None:
        where = "the socket from systemd"
    else:
        sock = bind_socket(cfg.socket, cfg.socket_group, cfg.socket_mode)
        where = str(cfg.socket)

    own_socket = where == str(cfg.socket)
    stop_event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_event.set)
    try:
        daemon = Daemon(cfg)
        try:
            await daemon.start()
            app = create_app(daemon)
            stop_server = await serve(app, sock, cfg.limits.request_header_timeout)
            watchdog = asyncio.create_task(sd.watchdog_loop(), name="watchdog")
            log.info(
                "autogentoo %s serving %s (storage %s)", __version__, where, cfg.storage.backend
            )
            sd.ready(f"serving {where}")
            await stop_event.wait()
            log.info("stopping")
            sd.stopping()
            watchdog.cancel()
            await stop_server()
        finally:
            await daemon.stop()
    finally:
        sock.close()
        if own_socket:
            cfg.socket.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_mod.setup(logging.DEBUG if args.debug else logging.INFO)
    try:
        return asyncio.run(amain(args))
    except config_mod.ConfigError as e:
        log.error("configuration error: %s", e)
        return 78  # EX_CONFIG: systemd will not restart-loop on it
    except SocketInUse as e:
        log.error("%s", e)
        return 75  # EX_TEMPFAIL


if __name__ == "__main__":
    sys.exit(main())
