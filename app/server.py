"""create_app(config): Flask + Flask-SocketIO (threading mode) wired to the store and the round loop."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from flask import Flask, jsonify
from flask_socketio import SocketIO

from app.api import bp as api_bp
from app.config import ServerConfig
from app.evaluator import Evaluator
from app.fl import SocketTransport, register_handlers
from app.registry import Registry
from app.rounds import RoundLoop
from app.store import Store
from shared.errors import MeshfedError


@dataclass
class Meshfed:
    """Everything one server process holds; reachable as app.extensions['meshfed']."""

    config: ServerConfig
    socketio: SocketIO
    store: Store
    registry: Registry
    loop: RoundLoop


def create_app(config: ServerConfig) -> Flask:
    """Build the server. It does not start the round loop: call start()/resume_if_interrupted()."""
    if not config.admin_token or not config.enrollment_token:
        raise ValueError("admin_token and enrollment_token must be set (run_server.py generates them)")
    app = Flask(__name__, static_folder=None)
    # An update body may be up to max_update_bytes plus its header frame; Werkzeug enforces this too.
    app.config["MAX_CONTENT_LENGTH"] = config.max_update_bytes + (1 << 20)
    # threading, not eventlet: eventlet froze the server for seconds during torch work (FACTS.md).
    # Socket.IO carries only control messages; weights go over HTTP, so 1 MB suffices.
    socketio = SocketIO(app, async_mode="threading", max_http_buffer_size=1 << 20, cors_allowed_origins=[])
    store = Store(config.state_dir)
    registry = Registry()

    @functools.lru_cache(maxsize=4)
    def evaluator(dataset: str, model: str) -> Evaluator:
        return Evaluator(dataset, model, config.data_dir, config.eval_limit)

    loop = RoundLoop(store, registry, SocketTransport(socketio, registry),
                     lambda run: evaluator(run.dataset, run.model), config.run, config.max_update_bytes,
                     spawn=socketio.start_background_task)
    app.extensions["meshfed"] = Meshfed(config, socketio, store, registry, loop)
    register_handlers(socketio, store, registry, loop, config.enrollment_token)
    app.register_blueprint(api_bp)

    from dashboard import bp as dashboard_bp  # the dashboard plugs into the app, not the other way
    app.register_blueprint(dashboard_bp)

    @app.errorhandler(MeshfedError)
    def on_meshfed_error(exc: MeshfedError) -> Any:
        return jsonify({"error": type(exc).__name__, "message": str(exc)}), 400

    @app.errorhandler(413)
    def on_too_large(exc: Any) -> Any:
        return jsonify({"error": "too_large", "reason": "too_large",
                        "message": f"request body over {app.config['MAX_CONTENT_LENGTH']} bytes"}), 413

    return app
