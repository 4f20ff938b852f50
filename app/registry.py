"""Which clients are connected right now, on which Socket.IO session, doing what."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

# Client states shown to operators.
ONLINE, TRAINING, IDLE, OFFLINE = "online", "training", "idle", "offline"


@dataclass(frozen=True)
class Session:
    client_id: str
    sid: str
    fingerprint: str
    num_examples: int
    state: str = ONLINE
    connected_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    resources: dict[str, float] = field(default_factory=dict)  # cpu_percent, memory_mb from the client
    mesh: dict[str, Any] = field(default_factory=dict)         # {mode, peers: [{id, mode}]} (mesh clients)


class Registry:
    """Thread-safe map client_id -> Session for connected clients; the newest connection wins."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, Session] = {}

    def connect(self, session: Session) -> Session | None:
        """Add a session; returns the one it replaced (same client id, older sid), if any."""
        with self._lock:
            old = self._by_id.get(session.client_id)
            self._by_id[session.client_id] = session
            return old

    def disconnect(self, sid: str) -> str | None:
        """Forget the session with this sid; returns its client id (None if it was already replaced)."""
        with self._lock:
            for cid, s in list(self._by_id.items()):
                if s.sid == sid:
                    del self._by_id[cid]
                    return cid
        return None

    def update(self, client_id: str, **changes: Any) -> None:
        with self._lock:
            s = self._by_id.get(client_id)
            if s is not None:
                self._by_id[client_id] = replace(s, last_seen=time.time(), **changes)

    def get(self, client_id: str) -> Session | None:
        with self._lock:
            return self._by_id.get(client_id)

    def client_for_sid(self, sid: str) -> str | None:
        with self._lock:
            return next((cid for cid, s in self._by_id.items() if s.sid == sid), None)

    def online(self) -> list[Session]:
        with self._lock:
            return sorted(self._by_id.values(), key=lambda s: s.client_id)
