"""What a client learned offline, kept in a local SQLite file that survives a restart.

One row per offline contribution: its id (random, the server merges each id once), the global
version it started from, local steps, examples, the peers it mixed with, and whether the server has
taken it. The base and current weights are safetensors files next to it, written atomically.
"""
from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.fileio import write_atomic
from shared.protocol import decode_weights, encode_weights

SCHEMA = """
CREATE TABLE IF NOT EXISTS contribution (
    id TEXT PRIMARY KEY, base_version INTEGER NOT NULL, local_steps INTEGER NOT NULL,
    num_examples INTEGER NOT NULL, peers TEXT NOT NULL, started REAL NOT NULL, updated REAL NOT NULL,
    synced REAL);
"""


@dataclass
class Contribution:
    id: str
    base_version: int
    base: dict[str, np.ndarray]
    current: dict[str, np.ndarray]
    num_examples: int
    local_steps: int = 0
    peers: list[str] = field(default_factory=list)


class OfflineStore:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.dir / "offline.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def begin(self, base_version: int, base: dict[str, np.ndarray], num_examples: int) -> Contribution:
        """A new contribution starting from the global model `base` (version base_version)."""
        c = Contribution(secrets.token_hex(16), base_version, base, {k: v.copy() for k, v in base.items()},
                         num_examples)
        write_atomic(self.dir / f"{c.id}.base.safetensors", encode_weights(base))
        self.save(c)
        return c

    def save(self, c: Contribution) -> None:
        """Persist the current weights and counters (after every gossip step)."""
        write_atomic(self.dir / f"{c.id}.current.safetensors", encode_weights(c.current))
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO contribution (id, base_version, local_steps, num_examples, peers, started, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET local_steps = excluded.local_steps, "
                "peers = excluded.peers, updated = excluded.updated",
                (c.id, c.base_version, c.local_steps, c.num_examples, json.dumps(sorted(c.peers)), now, now))

    def unsynced(self) -> Contribution | None:
        """The newest contribution the server has not taken yet, with its weights, or None."""
        with self._lock:
            row = self._db.execute("SELECT id, base_version, local_steps, num_examples, peers FROM contribution "
                                   "WHERE synced IS NULL ORDER BY updated DESC LIMIT 1").fetchone()
        if row is None:
            return None
        cid = row[0]
        return Contribution(cid, row[1], decode_weights((self.dir / f"{cid}.base.safetensors").read_bytes()),
                            decode_weights((self.dir / f"{cid}.current.safetensors").read_bytes()), row[3], row[2],
                            json.loads(row[4]))

    def mark_synced(self, contribution_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE contribution SET synced = ? WHERE id = ?", (time.time(), contribution_id))
        for suffix in ("base", "current"):
            (self.dir / f"{contribution_id}.{suffix}.safetensors").unlink(missing_ok=True)
