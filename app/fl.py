"""The /fl Socket.IO namespace (client registration and status) and the loop's transport over it."""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

from flask import request
from flask_socketio import ConnectionRefusedError, SocketIO

from app.enrollment import Enrollment
from app.ratelimit import RateLimited, RateLimits
from app.registry import IDLE, TRAINING, Registry, Session
from app.rounds import RoundLoop
from app.store import Store
from shared import frames
from shared.errors import RegistrationRefused, UpdateRefused
from shared.protocol import (EV_CANCEL, EV_CLIENT_STATUS, EV_NEW_MODEL, EV_TRAIN, EV_WELCOME, MAX_EXAMPLES, NAMESPACE,
                             Registration, TrainRequest)

log = logging.getLogger("meshfed.fl")
DASHBOARD_NAMESPACE = "/dashboard"


class SocketTransport:
    """Transport for the round loop: train/cancel to one client on /fl, publish to dashboards."""

    def __init__(self, socketio: SocketIO, registry: Registry,
                 observers: list[Callable[[str, dict[str, Any]], None]] | None = None):
        self.socketio, self.registry = socketio, registry
        self.observers = observers or []  # also told of every published event (the monitor's alerts)

    def send_train(self, client_id: str, request_: TrainRequest) -> bool:
        session = self.registry.get(client_id)
        if session is None:
            return False
        self.registry.update(client_id, state=TRAINING)
        self.socketio.emit(EV_TRAIN, request_.to_dict(), to=session.sid, namespace=NAMESPACE)
        return True

    def send_cancel(self, client_id: str, run_id: str, round_no: int) -> None:
        session = self.registry.get(client_id)
        if session is not None:
            self.socketio.emit(EV_CANCEL, {"run_id": run_id, "round": round_no}, to=session.sid, namespace=NAMESPACE)

    def announce_model(self, version: int, sha256: str) -> None:
        """Tell every client a new global model is committed: they fetch it while the server evaluates it."""
        self.socketio.emit(EV_NEW_MODEL, {"version": version, "sha256": sha256}, namespace=NAMESPACE)

    def publish(self, event: str, data: dict[str, Any]) -> None:
        self.socketio.emit(event, data, namespace=DASHBOARD_NAMESPACE)
        for observer in self.observers:
            observer(event, data)


def register_handlers(socketio: SocketIO, store: Store, registry: Registry, loop: RoundLoop,
                      enrollment: Enrollment, limits: RateLimits) -> None:
    """Thin handlers: decode, check, hand over to the registry and the loop."""

    @socketio.on("connect", namespace=NAMESPACE)
    def connect(auth: Any = None) -> None:
        """Admit a client: within its address's rate, a valid Registration signed over a fresh challenge
        (app/enrollment.py), the key pinned to its id, and no other live session for that id."""
        address = request.remote_addr
        claimed = str(auth.get("client_id"))[:64] if isinstance(auth, dict) else "?"
        try:
            limits.hit("connect-per-address", address)
            try:
                registration = frames.decode(Registration, auth)
            except UpdateRefused as exc:
                raise RegistrationRefused("bad_registration", f"{exc.args[0].removeprefix('malformed: ')}; "
                                          "this client may be older than the server") from None
            if not 0 < registration.num_examples <= MAX_EXAMPLES:
                raise RegistrationRefused("bad_registration", f"num_examples must be in 1..{MAX_EXAMPLES}")
            fingerprint = enrollment.admit(registration)
            store.pin_client(registration.client_id, registration.public_key, fingerprint,
                             registration.num_examples)
            session = Session(client_id=registration.client_id, sid=request.sid, fingerprint=fingerprint,
                              num_examples=registration.num_examples, state=IDLE)
            if not registry.connect(session):
                raise RegistrationRefused("already_connected", f"{registration.client_id!r} has a live session; "
                                                               "a client id connects once at a time")
        except RateLimited as exc:
            raise ConnectionRefusedError(str(exc)) from None
        except RegistrationRefused as exc:
            log.warning("refused a connection as %s from %s: %s", claimed, address, exc)
            raise ConnectionRefusedError(str(exc)) from None
        except Exception:  # a bug must not leave the client waiting for an answer that never comes
            log.exception("connection as %s from %s failed", claimed, address)
            raise ConnectionRefusedError("server_error: the server could not register this client; "
                                         "see the server log") from None
        log.info("client %s connected (%s)", session.client_id, fingerprint[:19])
        socketio.emit(EV_WELCOME, {"client_id": session.client_id, "run_id": loop.run_id, "fingerprint": fingerprint},
                      to=request.sid, namespace=NAMESPACE)
        loop.notify()

    @socketio.on("disconnect", namespace=NAMESPACE)
    def disconnect(*_: Any) -> None:
        client_id = registry.disconnect(request.sid)
        if client_id is not None:
            log.info("client %s disconnected", client_id)
            loop.client_gone(client_id)

    @socketio.on(EV_CLIENT_STATUS, namespace=NAMESPACE)
    def client_status(data: Any = None) -> None:
        """What a connected client reports: state, resources, its mesh view, and (after re-partitioning)
        its example count. The session was admitted by its signed registration, so this is the key holder."""
        client_id = registry.client_for_sid(request.sid)
        if client_id is None or not isinstance(data, dict):
            return
        resources = {k: float(data[k]) for k in ("cpu_percent", "memory_mb")
                     if isinstance(data.get(k), (int, float)) and math.isfinite(data[k]) and 0 <= data[k] <= 1e8}
        state = data.get("state") if data.get("state") in (IDLE, TRAINING) else None
        mesh = data.get("mesh")
        if isinstance(mesh, dict) and isinstance(mesh.get("peers"), list):
            mesh = {"mode": str(mesh.get("mode", ""))[:16], "peers": [
                {"id": str(p.get("id", ""))[:64], "mode": str(p.get("mode", ""))[:16]}
                for p in mesh["peers"][:256] if isinstance(p, dict)]}
        else:
            mesh = {}
        changes: dict[str, Any] = {"resources": resources, "mesh": mesh, **({"state": state} if state else {})}
        examples = data.get("num_examples")
        if isinstance(examples, int) and not isinstance(examples, bool) and 0 < examples <= MAX_EXAMPLES:
            store.set_examples(client_id, examples)
            changes["num_examples"] = examples
        registry.update(client_id, **changes)
