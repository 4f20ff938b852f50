"""The /fl Socket.IO namespace (client registration and status) and the loop's transport over it."""
from __future__ import annotations

import hmac
import logging
import re
from typing import Any, Callable

from flask import request
from flask_socketio import ConnectionRefusedError, SocketIO

from app.registry import IDLE, TRAINING, Registry, Session
from app.rounds import RoundLoop
from app.store import Store
from shared import crypto
from shared.errors import RegistrationRefused
from shared.protocol import EV_CANCEL, EV_CLIENT_STATUS, EV_NEW_MODEL, EV_TRAIN, EV_WELCOME, NAMESPACE, TrainRequest

log = logging.getLogger("meshfed.fl")
CLIENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
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
                      enrollment_token: str) -> None:
    """Thin handlers: decode, check, hand over to the registry and the loop."""

    @socketio.on("connect", namespace=NAMESPACE)
    def connect(auth: dict[str, Any] | None) -> None:
        auth = auth if isinstance(auth, dict) else {}
        client_id = str(auth.get("client_id", ""))
        if not CLIENT_ID.match(client_id):
            raise ConnectionRefusedError("bad_client_id: use 1-64 letters, digits, '_', '.' or '-'")
        if not hmac.compare_digest(str(auth.get("enrollment_token", "")).encode(), enrollment_token.encode()):
            log.warning("refused %s: wrong enrollment token", client_id)
            raise ConnectionRefusedError("bad_enrollment_token: pass the server's --enrollment-token")
        pem = str(auth.get("public_key", ""))
        try:
            fingerprint = crypto.fingerprint(pem)
            num_examples = int(auth.get("num_examples", 0))
            store.pin_client(client_id, pem, fingerprint, num_examples)
        except RegistrationRefused as exc:
            log.warning("refused %s: %s", client_id, exc)
            raise ConnectionRefusedError(f"key_mismatch: {exc}")
        except (ValueError, TypeError) as exc:
            raise ConnectionRefusedError(f"bad_public_key: send a PEM RSA public key of >= 2048 bits ({exc})")
        registry.connect(Session(client_id=client_id, sid=request.sid, fingerprint=fingerprint,
                                 num_examples=num_examples, state=IDLE))
        log.info("client %s connected (%s)", client_id, fingerprint[:19])
        socketio.emit(EV_WELCOME, {"client_id": client_id, "run_id": loop.run_id, "fingerprint": fingerprint},
                      to=request.sid, namespace=NAMESPACE)
        loop.notify()

    @socketio.on("disconnect", namespace=NAMESPACE)
    def disconnect(*_: Any) -> None:
        client_id = registry.disconnect(request.sid)
        if client_id is not None:
            log.info("client %s disconnected", client_id)
            loop.client_gone(client_id)

    @socketio.on(EV_CLIENT_STATUS, namespace=NAMESPACE)
    def client_status(data: dict[str, Any]) -> None:
        client_id = registry.client_for_sid(request.sid)
        if client_id is None or not isinstance(data, dict):
            return
        resources = {k: float(data[k]) for k in ("cpu_percent", "memory_mb") if isinstance(data.get(k), (int, float))}
        state = data.get("state") if data.get("state") in (IDLE, TRAINING) else None
        mesh = data.get("mesh")
        if isinstance(mesh, dict) and isinstance(mesh.get("peers"), list):
            mesh = {"mode": str(mesh.get("mode", "")), "peers": [
                {"id": str(p.get("id", ""))[:64], "mode": str(p.get("mode", ""))[:16]}
                for p in mesh["peers"][:256] if isinstance(p, dict)]}
        else:
            mesh = {}
        registry.update(client_id, resources=resources, mesh=mesh, **({"state": state} if state else {}))
