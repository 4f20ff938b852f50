"""The /dashboard Socket.IO namespace: live updates to browsers and their control events.

server -> browser: config_schema (the run configuration's JSON Schema: the form is made from it),
  status_update, metrics_update (one round), metrics_history (all rounds of a run, and the list of runs),
  training_started, training_stopped, clients_update, models_update, system_update, alert,
  update_refused, mesh_update (offline contributions and gossip edges), privacy_update (GET /api/privacy)
browser -> server (each answers through the Socket.IO acknowledgement):
  request_status, request_metrics [{run_id}], start_training {new_run}, stop_training,
  update_config {field: value}, rollback_model {version}
"""
from __future__ import annotations

import time
from functools import wraps
from typing import Any, Callable

from flask import request, session
from flask_socketio import ConnectionRefusedError, Namespace, SocketIO, emit

from dashboard import is_admin, log_in, sessions, token_ok
from dashboard.monitor import SAMPLE_SECONDS, Monitor
from shared.errors import ConfigError, MeshfedError

NAMESPACE = "/dashboard"


def admin_only(handler: Callable) -> Callable:
    """The event's answer: {"ok": True, ...} from the handler, or {"ok": False, "error"[, "fields"]}. The login
    is checked at every event, so one revoked since the socket opened stops here."""
    @wraps(handler)
    def wrapped(self: Any, *args: Any) -> Any:
        if not is_admin():
            return {"ok": False, "error": "unauthorized: log in with the admin token"}
        try:
            return {"ok": True, **(handler(self, *args) or {})}
        except ConfigError as exc:
            return {"ok": False, "error": "invalid configuration", "fields": exc.fields}
        except (MeshfedError, KeyError) as exc:
            return {"ok": False, "error": str(exc)}
    return wrapped


class DashboardNamespace(Namespace):
    """/dashboard: live updates for logged-in browsers and their control events. `control` is an app.control
    LocalControl (a leader) or RemoteControl (a follower, which asks the leader)."""

    def __init__(self, control: Any):
        super().__init__(NAMESPACE)
        self.control = control

    def on_connect(self, auth: Any = None) -> None:
        """Admit a logged-in browser (its session cookie) or a script with the token in the auth."""
        if not is_admin():
            if not token_ok(auth.get("token") if isinstance(auth, dict) else None):
                raise ConnectionRefusedError("unauthorized: open /?token=<admin token> or log in first")
            log_in()  # this socket's own session (Flask-SocketIO keeps one per connection)
        sessions().add_socket(session["login"], request.sid)

    def on_disconnect(self, *_: Any) -> None:
        sessions().drop_socket(session.get("login"), request.sid)

    @admin_only
    def on_request_status(self) -> dict[str, Any]:
        emit("config_schema", self.control.config_schema())
        emit("status_update", self.control.status())
        emit("clients_update", {"clients": self.control.clients()})
        emit("models_update", self.control.models())
        emit("system_history", self.control.system())
        emit("mesh_update", self.control.mesh())
        emit("privacy_update", self.control.privacy())
        return {}

    @admin_only
    def on_request_metrics(self, data: Any = None) -> dict[str, Any]:
        """The current run's rounds, or those of {run_id} (an earlier run, browsed), with the list of runs."""
        run_id = data.get("run_id") if isinstance(data, dict) else None
        emit("metrics_history", self.control.history(run_id if isinstance(run_id, str) and run_id else None))
        return {}

    @admin_only
    def on_start_training(self, data: Any = None) -> dict[str, Any]:
        new_run = bool(data.get("new_run")) if isinstance(data, dict) else False
        return self.control.start(new_run)

    @admin_only
    def on_stop_training(self, *_: Any) -> dict[str, Any]:
        self.control.stop()
        return {}

    @admin_only
    def on_update_config(self, data: Any = None) -> dict[str, Any]:
        return {"config": self.control.set_config(data if isinstance(data, dict) else {})}

    @admin_only
    def on_rollback_model(self, data: Any = None) -> dict[str, Any]:
        version = data.get("version") if isinstance(data, dict) else None
        if not isinstance(version, int) or isinstance(version, bool):
            raise MeshfedError("send {version: <int>}")
        new = self.control.rollback(version)
        self.emit("models_update", self.control.models())
        return {"model_version": new}


def feed(socketio: SocketIO, meshfed: Any, monitor: Monitor) -> None:
    """Background task: every SAMPLE_SECONDS, sample resources and push the client table to the browsers."""
    while True:
        monitor.sample()
        push_clients(socketio, meshfed)
        time.sleep(SAMPLE_SECONDS)


def push_clients(socketio: SocketIO, meshfed: Any) -> bool:
    """Send the client table to the dashboards; True if it was built. With no browser on this process and no
    message queue (whose followers' browsers get it), it is not: a query and a row per registered client, 3% of the
    server's interpreter with 1,000 clients (bench/swarm.py). A page that connects asks for it (request_status)."""
    if not (meshfed.config.message_queue or any(socketio.server.manager.get_participants(NAMESPACE, None))):
        return False
    socketio.emit("clients_update", {"clients": meshfed.clients_view()}, namespace=NAMESPACE)
    return True
