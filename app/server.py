"""create_app(config): Flask + Flask-SocketIO (threading mode) wired to the store and the round loop.

With config.role == "follower" the process has no loop and no store: it serves dashboards and asks
the leader for everything else (app/control.py); Socket.IO rooms are shared through the message queue.
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import hmac
import tempfile
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, jsonify
from flask_socketio import ConnectionRefusedError, SocketIO

from app.api import bp as api_bp
from app.config import ServerConfig
from app.control import LocalControl, RemoteControl
from app.evaluator import Evaluator
from app.ops import FollowerCollector, MeshfedCollector, Traffic, make_registry
from app.ops import bp as ops_bp
from app.fl import DASHBOARD_NAMESPACE, SocketTransport, register_handlers
from app.registry import Registry
from app.rounds import RoundLoop
from app.store import Store
from dashboard import bp as dashboard_bp
from dashboard.events import feed, register_dashboard
from dashboard.monitor import Monitor
from shared import crypto
from shared.errors import MeshfedError
from shared.protocol import NAMESPACE as FL_NAMESPACE


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
    leader_lock: Any = None       # app.leader.LeaderLock when sharing a message queue
    server_key: Any = None        # signs the roster mesh peers trust (state_dir/server.pem)

    def __post_init__(self) -> None:
        self.control = LocalControl(self)

    def readiness(self) -> dict[str, bool]:
        """/readyz checks: the state dir takes files, the database answers, the loop thread lives."""
        checks = {"state_dir_writable": True, "database": True, "loop_alive": self.loop.alive()}
        try:
            with tempfile.TemporaryFile(dir=self.store.root):
                pass
        except OSError:
            checks["state_dir_writable"] = False
        try:
            self.store.latest_run()
        except Exception:  # sqlite3.Error and friends: the database cannot answer
            checks["database"] = False
        return checks

    def clients_view(self) -> list[dict[str, Any]]:
        """Every registered client with its live state and resources. A client that is not connected
        but that a connected client's mesh sees in mesh mode is 'mesh' (it lost the server, not its
        peers); `mesh_peers` lists whom each connected mesh client sees."""
        online = {s.client_id: s for s in self.registry.online()}
        in_mesh = {p["id"] for s in online.values() for p in s.mesh.get("peers", []) if p["mode"] == "mesh"}
        rows = self.store.clients()
        for row in rows:
            s = online.get(row["id"])
            row["status"] = s.state if s else "mesh" if row["id"] in in_mesh else "offline"
            row["resources"] = s.resources if s else {}
            row["mesh_peers"] = [p["id"] for p in s.mesh.get("peers", [])] if s else []
        return rows

    def start_background(self) -> None:
        """Start the dashboard feed (resources, client table); call once, from run_server.py."""
        self.socketio.start_background_task(feed, self.socketio, self, self.monitor)


@dataclass
class Follower:
    """A server process that serves dashboards only; reachable as app.extensions['meshfed']."""

    config: ServerConfig
    socketio: SocketIO
    control: RemoteControl
    metrics_registry: Any = None

    def readiness(self) -> dict[str, bool]:
        return {"leader_reachable": self.control.alive()}

    def start_background(self) -> None:
        """Nothing to run: the leader's loop and feed reach this process's browsers through the queue."""


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
    socketio = SocketIO(app, async_mode="threading", max_http_buffer_size=1 << 20, cors_allowed_origins=[],
                        message_queue=config.message_queue, channel="meshfed")
    if config.role == "follower":
        return _follower(app, socketio, config)
    if config.role != "leader":
        raise ValueError(f"role must be 'leader' or 'follower', not {config.role!r}")
    lock = None
    if config.message_queue:
        from app.leader import LeaderLock, leader_identity  # needs redis, only installed where a queue is used
        lock = LeaderLock(config.message_queue, identity=leader_identity(config.port))
        lock.acquire()
        atexit.register(lock.release)  # a leader that exits cleanly frees the lock at once, not after its TTL
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
    meshfed = Meshfed(config, socketio, store, registry, loop, monitor, leader_lock=lock,
                      server_key=crypto.load_or_create_key(config.state_dir, "server"))
    meshfed.metrics_registry = make_registry(MeshfedCollector(meshfed))
    app.extensions["meshfed"] = meshfed
    register_handlers(socketio, store, registry, loop, config.enrollment_token)
    register_dashboard(socketio, meshfed.control)
    app.register_blueprint(api_bp)
    app.register_blueprint(ops_bp)
    app.register_blueprint(dashboard_bp)
    _register_errors(app)
    return app


def _follower(app: Flask, socketio: SocketIO, config: ServerConfig) -> Flask:
    """Dashboards only: pages, /dashboard (control forwarded to the leader), health and metrics."""
    if not config.leader_url or not config.message_queue:
        raise ValueError("a follower needs --leader-url and --message-queue (the leader's Redis)")
    follower = Follower(config, socketio, RemoteControl(config.leader_url, config.admin_token))
    follower.metrics_registry = make_registry(FollowerCollector(follower))
    app.extensions["meshfed"] = follower
    register_dashboard(socketio, follower.control)

    @socketio.on("connect", namespace=FL_NAMESPACE)
    def refuse_client(auth: Any = None) -> None:
        raise ConnectionRefusedError("not_leader: this process serves dashboards only; connect clients to the "
                                     "leader (the shipped nginx.conf routes them there)")

    @app.route("/api/<path:_>", methods=["GET", "POST"])
    def not_here(_: str) -> Any:
        return jsonify({"error": "not_leader", "message": "this process serves dashboards only; the API is "
                        "served by the leader (the shipped nginx.conf routes /api/ there)"}), 421

    app.register_blueprint(ops_bp)
    app.register_blueprint(dashboard_bp)
    _register_errors(app)
    return app


def _register_errors(app: Flask) -> None:

    @app.errorhandler(MeshfedError)
    def on_meshfed_error(exc: MeshfedError) -> Any:
        return jsonify({"error": type(exc).__name__, "message": str(exc)}), 400

    @app.errorhandler(413)
    def on_too_large(exc: Any) -> Any:
        return jsonify({"error": "too_large", "reason": "too_large",
                        "message": f"request body over {app.config['MAX_CONTENT_LENGTH']} bytes"}), 413
