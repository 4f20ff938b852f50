"""create_app(config): Flask + Flask-SocketIO (threading mode) wired to the store and the round loop.

With config.role == "follower" the process has no loop and no store: it serves dashboards and asks
the leader for everything else (app/control.py); Socket.IO rooms are shared through the message queue.
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import hmac
import logging
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from flask import Flask, jsonify, request
from flask.json.provider import DefaultJSONProvider
from flask.sessions import SecureCookieSessionInterface
from flask_socketio import ConnectionRefusedError, SocketIO
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from app.api import bp as api_bp
from app.config import ServerConfig
from app.control import LocalControl, RemoteControl
from app.enrollment import Enrollment
from app.evaluator import Evaluator, ProcessEvaluator
from app.rooms import IndexedManager, IndexedRedisManager
from app.ops import FollowerCollector, MeshfedCollector, Traffic, make_registry
from app.ops import bp as ops_bp
from app.fl import DASHBOARD_NAMESPACE, FlNamespace, SocketTransport, sweep_closed
from app.ratelimit import RateLimited, RateLimits
from app.refusals import Refusal
from app.registry import Registry
from app.rounds import RoundLoop
from app.runs import Runs
from app.store import Store
from dashboard import SESSION_SECONDS, AdminSessions, csrf
from dashboard import bp as dashboard_bp
from dashboard.events import DashboardNamespace, feed
from dashboard.monitor import Monitor
from shared import crypto, jsonio
from shared.errors import MeshfedError
from shared.protocol import NAMESPACE as FL_NAMESPACE

log = logging.getLogger("meshfed.server")

# Sent with every Flask response. script-src 'self': no inline script runs (the pages have none); every
# asset is served from here (no CDN); the pages may not be framed (clickjacking); no Referer leaves them
# (the first dashboard URL carries the token).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}  # and no versions in Server: run_server.py's werkzeug handler says 'meshfed', gunicorn says 'gunicorn'


@dataclass
class Meshfed:
    """Everything one server process holds; reachable as app.extensions['meshfed']."""

    config: ServerConfig
    socketio: SocketIO
    runs: Runs        # start, stop, resume, roll back, configure (app/runs.py)
    rounds: RoundLoop  # the round being played, updates, refusals (app/rounds.py)
    monitor: Monitor
    enrollment: Enrollment
    limits: RateLimits
    admin_sessions: AdminSessions
    traffic: Traffic = field(default_factory=Traffic)
    metrics_registry: Any = None  # prometheus_client registry for /metrics (app/ops.py)
    leader_lock: Any = None       # app.leader.LeaderLock when sharing a message queue
    server_key: Any = None        # signs the roster mesh peers trust (state_dir/server.pem)
    tier: Any = None              # app.tier.LeaderTier when sharing a message queue: edges may join

    store = property(lambda self: self.rounds.store)
    registry = property(lambda self: self.rounds.registry)
    control = property(lambda self: LocalControl(self))  # what the dashboard's namespace reads and controls

    def readiness(self) -> dict[str, bool]:
        """/readyz checks: the state dir takes files, the database answers, the loop thread lives."""
        checks = {"state_dir_writable": True, "database": True, "loop_alive": self.runs.alive()}
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
        self.rounds.refusals.flush()  # refusal counts as of now
        online = {s.client_id: s for s in self.registry.online()}
        in_mesh = {p["id"] for s in online.values() for p in s.mesh.get("peers", []) if p["mode"] == "mesh"}
        rows = self.store.clients()
        for row in rows:
            s = online.get(row["id"])
            row["status"] = s.state if s else "mesh" if row["id"] in in_mesh else "offline"
            row["resources"] = s.resources if s else {}
            if s:  # a connected client was last seen at its last status report, not its last stored round
                row["last_seen"] = max(row["last_seen"] or 0.0, s.last_seen)
            row["progress"] = s.progress if s and s.state == "training" else {}
            row["mesh_peers"] = [p["id"] for p in s.mesh.get("peers", [])] if s else []
        return rows

    def start_background(self) -> None:
        """Start the dashboard feed (resources, client table) and the refusal counts' flusher; call once,
        from run_server.py."""
        self.socketio.start_background_task(feed, self.socketio, self, self.monitor)
        self.socketio.start_background_task(self.rounds.refusals.run, threading.Event())
        self.socketio.start_background_task(sweep_closed, self.registry, self.socketio.server,
                                            lambda cid, _: self.rounds.collection.gone({cid}, "disconnected"))
        if self.tier is not None:
            self.tier.start()


@dataclass
class Follower:
    """A server process that serves dashboards only; reachable as app.extensions['meshfed']."""

    config: ServerConfig
    socketio: SocketIO
    control: RemoteControl
    limits: RateLimits
    admin_sessions: AdminSessions
    metrics_registry: Any = None

    def readiness(self) -> dict[str, bool]:
        return {"leader_reachable": self.control.alive()}

    def start_background(self) -> None:
        """Nothing to run: the leader's loop and feed reach this process's browsers through the queue."""


class _SocketJSON:
    """JSON for Socket.IO packets: standard JSON out (no NaN), bounded JSON in (shared/jsonio.py)."""

    dumps = staticmethod(jsonio.dumps)

    @staticmethod
    def loads(data: str | bytes, **_: Any) -> Any:
        return jsonio.loads(data, max_bytes=1 << 20)


class _JSONProvider(DefaultJSONProvider):
    """Flask's JSON through shared/jsonio.py: what the API serves is standard JSON, what it reads is bounded."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs.setdefault("default", self.default)
        kwargs.setdefault("ensure_ascii", self.ensure_ascii)
        kwargs.setdefault("sort_keys", self.sort_keys)
        return jsonio.dumps(obj, **kwargs)

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return jsonio.loads(s, max_bytes=1 << 20)


class _SessionInterface(SecureCookieSessionInterface):
    """The session cookie is Secure whenever the browser came over TLS (directly or through a trusted proxy)."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return request.is_secure


def create_app(config: ServerConfig) -> Flask:
    """Build the server. It does not start the round loop: call start()/resume_if_interrupted()."""
    if not config.admin_token or not config.enrollment_token:
        raise ValueError("admin_token and enrollment_token must be set (run_server.py generates them)")
    app = Flask(__name__, static_folder=None)
    app.json = _JSONProvider(app)
    app.session_interface = _SessionInterface()
    # Sessions survive a restart with the same admin token, and die with a new one.
    app.secret_key = hmac.new(config.admin_token.encode(), b"meshfed-session", hashlib.sha256).digest()
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict",
                      PERMANENT_SESSION_LIFETIME=timedelta(seconds=SESSION_SECONDS),
                      WTF_CSRF_CHECK_DEFAULT=False)  # CSRF is checked by the dashboard's two forms
    csrf.init_app(app)
    # An update body may be up to max_update_bytes plus its header frame; Werkzeug enforces this too.
    app.config["MAX_CONTENT_LENGTH"] = config.max_update_bytes + (1 << 20)
    # threading, not eventlet: eventlet froze the server for seconds during torch work (FACTS.md). Edges, which
    # do no torch work, may run on gevent (run_server.py --wsgi gevent): a greenlet per websocket, not a thread.
    # Socket.IO carries only control messages; weights go over HTTP, so 1 MB suffices.
    # cors_allowed_origins=None is python-engineio's same-origin check (an empty list would turn it off).
    rooms = IndexedRedisManager(config.message_queue, channel="meshfed") if config.message_queue \
        else IndexedManager()  # app/rooms.py: a disconnect in O(1), not O(clients)
    socketio = SocketIO(app, async_mode=config.async_mode, max_http_buffer_size=1 << 20,
                        cors_allowed_origins=list(config.allowed_origins) or None, json=_SocketJSON,
                        client_manager=rooms)
    if config.proxies:  # outermost, so Socket.IO's origin check and the rate limits see the client's address
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=config.proxies, x_proto=config.proxies,  # type: ignore
                                x_host=config.proxies)
    limits = RateLimits(dict(config.rate_limits))
    _register_errors(app)
    if config.role == "follower":
        return _follower(app, socketio, config, limits)
    if config.role == "edge":
        from app.edge import create_edge
        return create_edge(app, socketio, config, limits)
    if config.role != "leader":
        raise ValueError(f"role must be 'leader', 'follower' or 'edge', not {config.role!r}")
    lock = None
    if config.message_queue:
        from app.leader import LeaderLock, leader_identity  # needs redis, only installed where a queue is used
        lock = LeaderLock(config.message_queue, identity=leader_identity(config.port))
        lock.acquire()
        atexit.register(lock.release)  # a leader that exits cleanly frees the lock at once, not after its TTL
    store = Store(config.state_dir)
    registry = Registry()

    @functools.lru_cache(maxsize=4)
    def evaluator(dataset: str, model: str, process: bool) -> Evaluator:
        return (ProcessEvaluator if process else Evaluator)(dataset, model, config.data_dir, config.eval_limit)

    monitor = Monitor(lambda event, data: socketio.emit(event, data, namespace=DASHBOARD_NAMESPACE))
    transport = SocketTransport(socketio, registry, observers=[monitor.observe])
    if config.mlflow_uri:
        from app.tracking import MlflowTracker
        tracker = MlflowTracker(config.mlflow_uri, store, config.mlflow_artifacts)
        transport.observers.append(tracker.observe)
        atexit.register(tracker.close)
    tier = None
    if config.message_queue:  # edges (--role edge) may share the clients: app/tier.py
        from app.tier import LeaderTier
        tier = LeaderTier(config.message_queue, lambda *a: rounds.collection.remote_arrived(*a),
                          lambda m: rounds.count_refusal(_edge_refusal(m)),
                          lambda edge: _edge_lost(edge, registry, rounds))
    rounds = RoundLoop(store, registry, transport,
                       lambda run: evaluator(run.dataset, run.model, run.evaluation == "process"),
                       config.max_update_bytes, tier)
    runs = Runs(rounds, config.run, spawn=socketio.start_background_task)
    enrollment = Enrollment(config.enrollment_token)
    meshfed = Meshfed(config, socketio, runs, rounds, monitor, enrollment, limits,
                      AdminSessions(store), leader_lock=lock,
                      server_key=crypto.load_or_create_key(config.state_dir, "server"), tier=tier)
    meshfed.metrics_registry = make_registry(MeshfedCollector(meshfed))
    app.extensions["meshfed"] = meshfed
    socketio.on_namespace(FlNamespace(store, registry, runs, enrollment, limits))
    socketio.on_namespace(DashboardNamespace(meshfed.control))
    app.register_blueprint(api_bp)
    app.register_blueprint(ops_bp)
    app.register_blueprint(dashboard_bp)
    return app


def _edge_refusal(message: dict[str, Any]) -> Refusal:
    """A refusal an edge reports: charged to the client only if the edge verified its signature."""
    verified = message.get("verified") is True
    return Refusal(str(message.get("reason", "?"))[:40], str(message.get("message", ""))[:500],
                   client_id=str(message.get("client_id"))[:64] if verified else None,
                   address=None if verified else str(message.get("address"))[:64],
                   run_id=message.get("run_id") if isinstance(message.get("run_id"), str) else None,
                   round=message.get("round") if isinstance(message.get("round"), int) else None)


def _edge_lost(edge: str, registry: Registry, rounds: RoundLoop) -> None:
    """An edge stopped: its sessions end, and the open round stops waiting for them."""
    gone = registry.drop_edge(edge)
    if gone:
        rounds.collection.gone(set(gone), f"its edge {edge} stopped")
        rounds.wake()


def _follower(app: Flask, socketio: SocketIO, config: ServerConfig, limits: RateLimits) -> Flask:
    """Dashboards only: pages, /dashboard (control forwarded to the leader), health and metrics."""
    if not config.leader_url or not config.message_queue:
        raise ValueError("a follower needs --leader-url and --message-queue (the leader's Redis)")
    follower = Follower(config, socketio, RemoteControl(config.leader_url, config.admin_token), limits,
                        AdminSessions())  # logouts are remembered in memory: a restarted follower forgets them
    follower.metrics_registry = make_registry(FollowerCollector(follower))
    app.extensions["meshfed"] = follower
    socketio.on_namespace(DashboardNamespace(follower.control))

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
    return app


def _register_errors(app: Flask) -> None:
    """Every error is JSON with a message that says what to do; every response carries SECURITY_HEADERS."""

    @app.after_request
    def harden(response: Any) -> Any:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.errorhandler(RateLimited)
    def on_rate_limited(exc: RateLimited) -> Any:
        reply = jsonify({"error": "rate_limited", "reason": "rate_limited", "message": str(exc)})
        reply.headers["Retry-After"] = str(int(exc.retry_after + 0.999))
        return reply, 429

    @app.errorhandler(MeshfedError)
    def on_meshfed_error(exc: MeshfedError) -> Any:
        return jsonify({"error": type(exc).__name__, "message": str(exc)}), 400

    @app.errorhandler(413)
    def on_too_large(exc: Any) -> Any:
        return jsonify({"error": "too_large", "reason": "too_large",
                        "message": f"request body over {app.config['MAX_CONTENT_LENGTH']} bytes"}), 413

    @app.errorhandler(HTTPException)
    def on_http_error(exc: HTTPException) -> Any:
        reply = jsonify({"error": (exc.name or "error").lower().replace(" ", "_"),
                         "message": exc.description or exc.name})
        for name, value in exc.get_headers():  # e.g. Allow, on a 405
            if name.lower() != "content-type":
                reply.headers[name] = value
        return reply, exc.code or 400

    @app.errorhandler(Exception)
    def on_bug(exc: Exception) -> Any:  # a bug: logged in full, answered without internals
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify({"error": "internal_error", "message": "the server failed; see its log"}), 500
