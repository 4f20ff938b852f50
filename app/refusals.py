"""Refusals, counted against whoever is proven to have sent them.

A refusal raised after the sender's signature verified is charged to that client (its reputation, the
"refused" alert, /api/clients). Anything refused before that (a bad frame, a forged signature, a body over
the limit, an address over its rate) is counted against the source address only, whatever client id the
request claimed: a claim nobody verified must not cost a client anything.

Counts are aggregated in memory and written to SQLite in one transaction per flush (every FLUSH_SECONDS,
and before every read), so a flood costs one fsync a flush, not one a request. The store keeps counts per
(client or address, reason), at most MAX_ADDRESSES addresses, and the latest RECENT refusals for /api/refusals.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

FLUSH_SECONDS = 2.0
MAX_ADDRESSES = 4096   # address rows kept in the store (the least recently refused go first)
RECENT = 1000          # refusal rows kept for /api/refusals
PENDING = 10_000       # refusals held between two flushes for the recent log (counts are never dropped)


@dataclass(frozen=True)
class Refusal:
    """One refused request. Exactly one of client_id (verified sender) and address is set."""

    reason: str
    message: str
    client_id: str | None = None
    address: str | None = None
    run_id: str | None = None
    round: int | None = None
    time: float = field(default_factory=time.time)

    @property
    def verified(self) -> bool:
        return self.client_id is not None


class RefusalLedger:
    """Aggregates refusals in memory and flushes them to the store; thread-safe."""

    def __init__(self, store: Any):
        self.store = store
        self._lock = threading.Lock()
        self._counts: Counter[tuple[bool, str, str]] = Counter()  # (verified, client or address, reason) -> n
        self._recent: deque[Refusal] = deque(maxlen=PENDING)

    def add(self, refusal: Refusal) -> None:
        subject = refusal.client_id if refusal.verified else (refusal.address or "unknown")
        with self._lock:
            self._counts[(refusal.verified, subject, refusal.reason)] += 1
            self._recent.append(refusal)

    def flush(self) -> None:
        """Write what was counted since the last flush, in one transaction."""
        with self._lock:
            counts, recent = self._counts, list(self._recent)
            self._counts, self._recent = Counter(), deque(maxlen=PENDING)
        if counts:
            self.store.record_refusals(counts, recent[-RECENT:], max_addresses=MAX_ADDRESSES, keep=RECENT)

    def run(self, stop: threading.Event) -> None:
        """Flush every FLUSH_SECONDS until stop is set (a background thread of the server)."""
        while not stop.wait(FLUSH_SECONDS):
            self.flush()
