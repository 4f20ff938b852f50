"""The ways run_server.py serves the app: werkzeug's threaded server, or gunicorn in-process with threads (the
production default) or with gevent's greenlets (edges only: --wsgi gevent).

Imported only once the flags are parsed (Flask, gunicorn and werkzeug take a while to load).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from gunicorn import glogging
from gunicorn.app.base import BaseApplication
from werkzeug.serving import WSGIRequestHandler, run_simple

from shared.log import JsonFormatter

if TYPE_CHECKING:
    from flask import Flask

    from app.config import ServerConfig

log = logging.getLogger("meshfed.server")


def run_werkzeug(app: Flask, host: str, port: int) -> None:
    """What socketio.run() starts in threading mode (the app already wraps the Socket.IO middleware), without
    Flask's plain-text banner, so a --log-format json log stays JSON throughout."""
    run_simple(host, port, app, threaded=True, request_handler=QuietRequestHandler)


class QuietRequestHandler(WSGIRequestHandler):
    """werkzeug's handler without versions (of werkzeug and Python) in the Server header, and without an error
    line for the bytes a closing websocket leaves on its socket."""

    def version_string(self) -> str:
        return "meshfed"

    def _after_websocket(self) -> bool:
        # http.server reads a websocket's last frame (a close frame starts with byte 0x88) as a request line
        line = getattr(self, "raw_requestline", b"") or b""
        return bool(line) and not (0x20 <= line[0] < 0x7F)

    def log_error(self, format: str, *args: object) -> None:
        if self._after_websocket():
            log.debug("a websocket closed with bytes left unread (%d)", len(self.raw_requestline))
            return
        super().log_error(format, *args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if not self._after_websocket():
            super().log_request(code, size)


class JsonGunicornLogger(glogging.Logger):
    """gunicorn's own lines (starting, booting and stopping the worker) as JSON, for --log-format json."""

    def setup(self, cfg: object) -> None:
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(JsonFormatter())


def worker_connections(threads: int) -> int:
    """gunicorn's cap on a worker's open connections (its default, 1,000, holds even for gthread workers: with
    1,000 websockets open the worker accepted nothing else, not even /healthz). Each websocket holds one of the
    `threads` for its life; the cap leaves room for as many plain requests waiting for a thread again."""
    return max(1000, 2 * threads)


class Gunicorn(BaseApplication):
    """gunicorn in-process (its documented custom-application API), configured from our flags.

    One worker with many threads: Flask-SocketIO's threading mode holds a thread per websocket, and
    the round loop must live in exactly one process. load() runs in the worker, after the fork, so
    the loop's threads start there.

    With `worker_class="gevent"` (an edge's --wsgi gevent) the worker holds a greenlet per connection instead,
    and `threads` caps the connections. gunicorn's gevent worker monkey-patches the standard library before
    load(), so the edge's threads, locks, sockets and Redis client are gevent's. Nothing an edge does holds the
    interpreter for long (a signature check, a hash and a sum per update: about 1 ms); the leader's torch work
    would stall every connection, so the leader stays on threads.
    """

    def __init__(self, load: Callable[[], Flask], config: ServerConfig, threads: int, json_logs: bool,
                 worker_class: str = "gthread"):
        self._load, self.config, self.threads, self.json_logs = load, config, threads, json_logs
        self.worker_class = worker_class
        super().__init__()

    def load_config(self) -> None:
        for key, value in {"bind": f"{self.config.host}:{self.config.port}", "workers": 1,
                           "worker_class": self.worker_class, "threads": self.threads,
                           "worker_connections": worker_connections(self.threads), "graceful_timeout": 5,
                           "timeout": 120, "control_socket_disable": True, "accesslog": None,
                           "on_exit": self.on_exit}.items():
            self.cfg.set(key, value)
        if self.json_logs:
            self.cfg.set("logger_class", JsonGunicornLogger)

    def load(self) -> Flask:
        return self._load()

    def on_exit(self, arbiter: object) -> None:
        """In the master, once the worker is gone: free the leader lock it held. The worker's own exit
        handlers do not get to run: threads holding websockets keep it alive until the master kills it."""
        if self.config.message_queue and self.config.role == "leader":
            from app.leader import leader_identity, release_if_held
            release_if_held(self.config.message_queue, leader_identity(self.config.port))
