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
    privacy: dict[str, Any] = field(default_factory=dict)      # {epsilon, exhausted} (dp 'sample' / 'local')
    progress: dict[str, int] = field(default_factory=dict)     # {round, done, total}: batches, while training
    edge: str | None = None  # the edge server holding its websocket (app/tier.py); None: this process


class Registry:
    """Thread-safe map of connected clients, by client id and by Socket.IO sid (both O(1)).

    One live session per client id: a second connection for an id that is connected is refused, not
    preferred, so nobody can push a client's own session aside (app/fl.py).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, Session] = {}
        self._by_sid: dict[str, str] = {}  # sid -> client id

    def connect(self, session: Session, replace: str | None = None) -> bool:
        """Add a session; False (and nothing changes) if its client id already has a live one, unless that one's
        sid is `replace` (a session the caller found dead: its edge stopped, app/tier.py)."""
        with self._lock:
            old = self._by_id.get(session.client_id)
            if old is not None and old.sid != replace:
                return False
            if old is not None:
                self._by_sid.pop(old.sid, None)
            self._by_id[session.client_id] = session
            self._by_sid[session.sid] = session.client_id
            return True

    def disconnect(self, sid: str) -> str | None:
        """Forget the session with this sid; returns its client id (None if none had it)."""
        with self._lock:
            client_id = self._by_sid.pop(sid, None)
            if client_id is not None:
                del self._by_id[client_id]
            return client_id

    def drop_edge(self, edge: str) -> list[str]:
        """Forget every session held by `edge` (it stopped); returns their client ids."""
        with self._lock:
            gone = [cid for cid, s in self._by_id.items() if s.edge == edge]
            for cid in gone:
                self._by_sid.pop(self._by_id.pop(cid).sid, None)
            return gone

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
            return self._by_sid.get(sid)

    def count(self) -> int:
        """How many are connected (what /api/status and /metrics show, without sorting every session)."""
        with self._lock:
            return len(self._by_id)

    def online(self) -> list[Session]:
        with self._lock:
            return sorted(self._by_id.values(), key=lambda s: s.client_id)
