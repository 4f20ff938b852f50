"""create_app(config): Flask + Flask-SocketIO (threading mode) wired to the store and the round loop."""
from __future__ import annotations

import functools
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, jsonify
from flask_socketio import SocketIO

from app.api import bp as api_bp
from app.config import ServerConfig
from app.evaluator import Evaluator
from app.ops import Traffic, make_registry
from app.ops import bp as ops_bp
from app.fl import DASHBOARD_NAMESPACE, SocketTransport, register_handlers
from app.registry import Registry
from app.rounds import RoundLoop
from app.store import Store
from dashboard import bp as dashboard_bp
from dashboard.events import feed, register_dashboard
from dashboard.monitor import Monitor
from shared.errors import MeshfedError


@dataclass
class Meshfed:
    """Everything one server process holds; reachable as app.extensions['meshfed']."""

    config: ServerConfig
    socketio: SocketIO
    store: Store
    registry: Registry
    loop: RoundLoop
    monitor: Monitor
    traffic: Traffic = field(default_factory=Traffic)
    metrics_registry: Any = None  # prometheus_client registry for /metrics (app/ops.py)

    def clients_view(self) -> list[dict[str, Any]]:
        """Every registered client with its live state ('offline' when not connected) and resources."""
        online = {s.client_id: s for s in self.registry.online()}
        rows = self.store.clients()
        for row in rows:
            s = online.get(row["id"])
            row["status"] = s.state if s else "offline"
            row["resources"] = s.resources if s else {}
        return rows

    def start_background(self) -> None:
        """Start the dashboard feed (resources, client table); call once, from run_server.py."""
        self.socketio.start_background_task(feed, self.socketio, self, self.monitor)


def create_app(config: ServerConfig) -> Flask:
    """Build the server. It does not start the round loop: call start()/resume_if_interrupted()."""
    if not config.admin_token or not config.enrollment_token:
        raise ValueError("admin_token and enrollment_token must be set (run_server.py generates them)")
    app = Flask(__name__, static_folder=None)
    # Sessions survive a restart with the same admin token, and die with a new one.
    app.secret_key = hmac.new(config.admin_token.encode(), b"meshfed-session", hashlib.sha256).digest()
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict")
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

    monitor = Monitor(lambda event, data: socketio.emit(event, data, namespace=DASHBOARD_NAMESPACE))
    transport = SocketTransport(socketio, registry, observers=[monitor.observe])
    loop = RoundLoop(store, registry, transport,
                     lambda run: evaluator(run.dataset, run.model), config.run, config.max_update_bytes,
                     spawn=socketio.start_background_task)
    meshfed = Meshfed(config, socketio, store, registry, loop, monitor)
    meshfed.metrics_registry = make_registry(meshfed)
    app.extensions["meshfed"] = meshfed
    register_handlers(socketio, store, registry, loop, config.enrollment_token)
    register_dashboard(socketio, meshfed, monitor)
    app.register_blueprint(api_bp)
    app.register_blueprint(ops_bp)
    app.register_blueprint(dashboard_bp)

    @app.errorhandler(MeshfedError)
    def on_meshfed_error(exc: MeshfedError) -> Any:
        return jsonify({"error": type(exc).__name__, "message": str(exc)}), 400

    @app.errorhandler(413)
    def on_too_large(exc: Any) -> Any:
        return jsonify({"error": "too_large", "reason": "too_large",
                        "message": f"request body over {app.config['MAX_CONTENT_LENGTH']} bytes"}), 413

    return app
