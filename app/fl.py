"""The /fl Socket.IO namespace (client registration and status) and the rounds' transport over it."""
from __future__ import annotations

import logging
import math
import threading
from typing import Any, Callable

from flask import request
from flask_socketio import ConnectionRefusedError, Namespace, SocketIO

from app.enrollment import Enrollment
from app.ratelimit import RateLimited, RateLimits
from app.registry import IDLE, TRAINING, Registry, Session
from app.runs import Runs
from app.store import Store
from shared import jsonio
from shared.errors import RegistrationRefused
from shared.protocol import (EV_CANCEL, EV_NEW_MODEL, EV_SECAGG, EV_TRAIN, EV_WELCOME, MAX_EXAMPLES, NAMESPACE,
                             TrainRequest)

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

    def send_secagg(self, client_id: str, data: dict[str, Any]) -> bool:
        """A secure round's stage message to one client (app/secagg.py); False if it is not connected."""
        session = self.registry.get(client_id)
        if session is None:
            return False
        self.socketio.emit(EV_SECAGG, data, to=session.sid, namespace=NAMESPACE)
        return True

    def announce_model(self, version: int, sha256: str) -> None:
        """Tell every client a new global model is committed: they fetch it while the server evaluates it."""
        self.socketio.emit(EV_NEW_MODEL, {"version": version, "sha256": sha256}, namespace=NAMESPACE)

    def publish(self, event: str, data: dict[str, Any]) -> None:
        self.socketio.emit(event, data, namespace=DASHBOARD_NAMESPACE)
        for observer in self.observers:
            observer(event, data)


def _progress(raw: Any) -> dict[str, int]:
    """A training client's batches done of its total in a round (advisory, for the dashboard), or {}."""
    if not isinstance(raw, dict):
        return {}
    values = {k: raw.get(k) for k in ("round", "done", "total")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10**12 for v in values.values()) \
            or values["total"] == 0:
        return {}
    return {**values, "done": min(values["done"], values["total"])}


def apply_status(client_id: str, data: Any, store: Store, registry: Registry, collection: Any) -> None:
    """A connected client's report (EV_CLIENT_STATUS, here or forwarded by its edge): state, resources, its mesh
    view, its privacy spent, and (after re-partitioning) its example count; anything malformed is left out."""
    if not isinstance(data, dict):
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
    changes: dict[str, Any] = {"resources": resources, "mesh": mesh, **({"state": state} if state else {}),
                               "progress": _progress(data.get("progress")) if state == TRAINING else {}}
    privacy = data.get("privacy")
    if isinstance(privacy, dict):  # a client whose budget is spent says so: it is asked no more
        epsilon = privacy.get("epsilon")
        changes["privacy"] = {"exhausted": privacy.get("exhausted") is True,
                              "epsilon": float(epsilon) if isinstance(epsilon, (int, float)) and
                              math.isfinite(epsilon) and 0 <= epsilon <= 1e6 else 0.0}
        if changes["privacy"]["exhausted"]:
            collection.gone({client_id}, "its privacy budget is spent")
    examples = data.get("num_examples")
    session = registry.get(client_id)
    if isinstance(examples, int) and not isinstance(examples, bool) and 0 < examples <= MAX_EXAMPLES and \
            session is not None and examples != session.num_examples:  # a write only when it changed
        store.set_examples(client_id, examples)
        changes["num_examples"] = examples
    registry.update(client_id, **changes)


SWEEP_SECONDS = 15.0  # how often sessions whose socket closed unseen are looked for


def closed_sessions(registry: Registry, server: Any, edge: str | None = None) -> list[str]:
    """The sids of this process's sessions (those of `edge`; None: the leader's own) whose Engine.IO socket is
    gone. python-socketio does not call the disconnect handler for a socket that closes while its connect handler
    is still running: it drops the event (the session is only "connecting"), and once the handler returns it
    holds the session as connected for good.
    Measured at 4,000 clients on busy edges, whose connect handlers wait for the leader: 13 such sessions,
    asked every round and waited for until the deadline."""
    gone = []
    for session in registry.online():
        if session.edge != edge:  # another process's session: it sweeps its own
            continue
        if not socket_open(server, session.sid):
            gone.append(session.sid)
    return gone


def socket_open(server: Any, sid: str) -> bool:
    """Whether the Engine.IO socket under Socket.IO session `sid` (of /fl) is open."""
    eio_sid = server.manager.eio_sid_from_sid(sid, NAMESPACE)
    socket = server.eio.sockets.get(eio_sid) if eio_sid is not None else None
    return socket is not None and not socket.closed


def sweep_closed(registry: Registry, server: Any, on_gone: Callable[[str, str], None], edge: str | None = None,
                 every: float = SWEEP_SECONDS, stop: threading.Event | None = None) -> None:
    """Until `stop`: end the sessions closed_sessions() finds, as a disconnect would; on_gone(client_id, sid)."""
    stop = stop or threading.Event()
    while not stop.wait(every):
        try:
            for sid in closed_sessions(registry, server, edge):
                client_id = registry.disconnect(sid)
                server.manager.disconnect(sid, NAMESPACE, ignore_queue=True)  # python-socketio's record of it
                if client_id is not None:
                    log.warning("client %s: its socket closed while it registered; its session ends", client_id)
                    on_gone(client_id, sid)
        except Exception:  # never let the sweep die
            log.exception("sweeping closed sessions failed")


class FlNamespace(Namespace):
    """/fl: clients register (connect), report their status, and leave. Thin: decode, check, hand over to the
    registry and the runs."""

    def __init__(self, store: Store, registry: Registry, runs: Runs, enrollment: Enrollment, limits: RateLimits):
        super().__init__(NAMESPACE)
        self.store, self.registry, self.runs, self.enrollment, self.limits = store, registry, runs, enrollment, limits

    def on_connect(self, auth: Any = None) -> None:
        """Admit a client or refuse it with a reason (ConnectionRefusedError reaches it as connect_error)."""
        claimed = str(auth.get("client_id"))[:64] if isinstance(auth, dict) else "?"
        try:
            session = self._admit(auth)
        except RateLimited as exc:
            raise ConnectionRefusedError(str(exc)) from None
        except RegistrationRefused as exc:
            log.warning("refused a connection as %s from %s: %s", claimed, request.remote_addr, exc)
            raise ConnectionRefusedError(str(exc)) from None
        except Exception:  # a bug must not leave the client waiting for an answer that never comes
            log.exception("connection as %s from %s failed", claimed, request.remote_addr)
            raise ConnectionRefusedError("server_error: the server could not register this client; "
                                         "see the server log") from None
        log.info("client %s connected (%s)", session.client_id, session.fingerprint[:19])
        self.emit(EV_WELCOME, {"client_id": session.client_id, "run_id": self.runs.run_id,
                               "fingerprint": session.fingerprint}, room=request.sid)
        self.runs.notify()

    def _admit(self, auth: Any) -> Session:
        """Within its address's rate, a valid Registration signed over a fresh challenge (app/enrollment.py),
        the key pinned to its id, and no other live session for that id."""
        self.limits.hit("connect-per-address", request.remote_addr)
        registration, fingerprint = self.enrollment.admit_auth(auth)
        self.store.pin_client(registration.client_id, registration.public_key, fingerprint, registration.num_examples)
        session = Session(client_id=registration.client_id, sid=request.sid, fingerprint=fingerprint,
                          num_examples=registration.num_examples, state=IDLE)
        if not self.registry.connect(session):
            raise RegistrationRefused("already_connected", f"{registration.client_id!r} has a live session; "
                                                           "a client id connects once at a time")
        return session

    def on_disconnect(self, *_: Any) -> None:
        client_id = self.registry.disconnect(request.sid)
        if client_id is not None:
            log.info("client %s disconnected", client_id)
            self.runs.rounds.collection.gone({client_id}, "disconnected")

    def on_client_status(self, data: Any = None) -> None:  # EV_CLIENT_STATUS
        """What a connected client reports. The session was admitted by its signed registration, so this is the
        key holder."""
        client_id = self.registry.client_for_sid(request.sid)
        if client_id is not None:
            apply_status(client_id, data, self.store, self.registry, self.runs.rounds.collection)

    def on_secagg(self, data: Any = None) -> dict[str, Any]:  # EV_SECAGG
        """A secure round's stage message (keys, shares, reveal), signed by the client's key and checked in
        app/secagg.py; the answer (Socket.IO's ack) says whether it was taken, and if not, why."""
        client_id = self.registry.client_for_sid(request.sid)
        if client_id is None:
            return {"accepted": False, "reason": "not registered"}
        try:
            self.limits.hit("secagg-per-client", client_id)
        except RateLimited as exc:
            return {"accepted": False, "reason": str(exc)}
        size = len(jsonio.dumps(data)) if isinstance(data, dict) else 0
        return self.runs.rounds.secure.receive(client_id, data, size)
