"""The /dashboard Socket.IO namespace: live updates to browsers and their control events.

server -> browser: status_update, metrics_update (one round), metrics_history (all rounds of the run),
  training_started, training_stopped, clients_update, models_update, system_update, alert,
  update_refused, mesh_update (offline contributions and gossip edges)
browser -> server (each answers through the Socket.IO acknowledgement):
  request_status, request_metrics, start_training {new_run}, stop_training,
  update_config {field: value}, rollback_model {version}
"""
from __future__ import annotations

import time
from functools import wraps
from typing import Any, Callable

from flask import request, session
from flask_socketio import ConnectionRefusedError, SocketIO, emit

from dashboard import is_admin, log_in, sessions, token_ok
from dashboard.monitor import SAMPLE_SECONDS, Monitor
from shared.errors import ConfigError, MeshfedError

NAMESPACE = "/dashboard"


def register_dashboard(socketio: SocketIO, control: Any) -> None:
    """Attach the /dashboard handlers; `control` is an app.control LocalControl or RemoteControl."""

    def admin_only(handler: Callable) -> Callable:
        @wraps(handler)
        def wrapped(*args: Any) -> Any:
            if not is_admin():  # checked at every event: a login revoked since the socket opened stops here
                return {"ok": False, "error": "unauthorized: log in with the admin token"}
            try:
                return {"ok": True, **(handler(*args) or {})}
            except ConfigError as exc:
                return {"ok": False, "error": "invalid configuration", "fields": exc.fields}
            except (MeshfedError, KeyError) as exc:
                return {"ok": False, "error": str(exc)}
        return wrapped

    @socketio.on("connect", namespace=NAMESPACE)
    def connect(auth: Any = None) -> None:
        """Admit a logged-in browser (its session cookie) or a script with the token in the auth."""
        if not is_admin():
            if not token_ok(auth.get("token") if isinstance(auth, dict) else None):
                raise ConnectionRefusedError("unauthorized: open /?token=<admin token> or log in first")
            log_in()  # this socket's own session (Flask-SocketIO keeps one per connection)
        sessions().add_socket(session["login"], request.sid)

    @socketio.on("disconnect", namespace=NAMESPACE)
    def disconnect(*_: Any) -> None:
        sessions().drop_socket(session.get("login"), request.sid)

    @socketio.on("request_status", namespace=NAMESPACE)
    @admin_only
    def request_status() -> dict[str, Any]:
        emit("status_update", control.status())
        emit("clients_update", {"clients": control.clients()})
        emit("models_update", control.models())
        emit("system_history", control.system())
        emit("mesh_update", control.mesh())
        return {}

    @socketio.on("request_metrics", namespace=NAMESPACE)
    @admin_only
    def request_metrics() -> dict[str, Any]:
        emit("metrics_history", control.history())
        return {}

    @socketio.on("start_training", namespace=NAMESPACE)
    @admin_only
    def start_training(data: Any = None) -> dict[str, Any]:
        new_run = bool(data.get("new_run")) if isinstance(data, dict) else False
        return {"run_id": control.start(new_run)}

    @socketio.on("stop_training", namespace=NAMESPACE)
    @admin_only
    def stop_training(*_: Any) -> dict[str, Any]:
        control.stop()
        return {}

    @socketio.on("update_config", namespace=NAMESPACE)
    @admin_only
    def update_config(data: Any = None) -> dict[str, Any]:
        return {"config": control.set_config(data if isinstance(data, dict) else {})}

    @socketio.on("rollback_model", namespace=NAMESPACE)
    @admin_only
    def rollback_model(data: Any = None) -> dict[str, Any]:
        version = data.get("version") if isinstance(data, dict) else None
        if not isinstance(version, int) or isinstance(version, bool):
            raise MeshfedError("send {version: <int>}")
        new = control.rollback(version)
        socketio.emit("models_update", control.models(), namespace=NAMESPACE)
        return {"model_version": new}


def feed(socketio: SocketIO, meshfed: Any, monitor: Monitor) -> None:
    """Background task: every SAMPLE_SECONDS, sample resources and push the client table."""
    while True:
        monitor.sample()
        socketio.emit("clients_update", {"clients": meshfed.clients_view()}, namespace=NAMESPACE)
        time.sleep(SAMPLE_SECONDS)
