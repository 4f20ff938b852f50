"""Persistent state: SQLite (WAL) for runs, rounds, clients, refusals and model versions;
each model version is a safetensors checkpoint written atomically (temp file, fsync, rename).

A version row is committed only after its file is on disk, in the same transaction as the round
that produced it, so a SIGKILL at any point leaves either the whole round or none of it.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import jsonio
from shared.errors import RegistrationRefused
from shared.fileio import write_atomic
from shared.protocol import sha256_hex


@dataclass(frozen=True)
class Checkpoint:
    """A model version's files on disk, not yet recorded (Store.write_checkpoint -> Store.commit_round)."""

    version: int
    path: str                # file name under models/
    sha256: str              # of the model bytes
    state_path: str | None   # strategy state file name, if the strategy keeps state


SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, config TEXT NOT NULL, status TEXT NOT NULL, stop_reason TEXT,
    completed_round INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, from_version INTEGER);
CREATE TABLE IF NOT EXISTS model_versions (
    version INTEGER PRIMARY KEY, run_id TEXT, round INTEGER, source TEXT NOT NULL, parent INTEGER,
    sha256 TEXT NOT NULL, path TEXT NOT NULL, accuracy REAL, loss REAL, created REAL NOT NULL,
    state_path TEXT);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, model_version INTEGER NOT NULL,
    accuracy REAL, loss REAL, num_clients INTEGER, num_selected INTEGER, num_refused INTEGER,
    seconds REAL, train_seconds REAL, eval_seconds REAL, ended REAL, clients TEXT, timings TEXT, flagged TEXT,
    stragglers TEXT, privacy TEXT, secure TEXT, dropped TEXT, evaluated INTEGER, PRIMARY KEY (run_id, round));
CREATE TABLE IF NOT EXISTS clients (
    id TEXT PRIMARY KEY, public_key TEXT NOT NULL, fingerprint TEXT NOT NULL, registered REAL NOT NULL,
    last_seen REAL, num_examples INTEGER, last_round INTEGER, accepted INTEGER NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0, flagged INTEGER NOT NULL DEFAULT 0, dropouts INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS contributions (
    id TEXT PRIMARY KEY, client_id TEXT NOT NULL, base_version INTEGER NOT NULL, local_steps INTEGER,
    num_examples INTEGER NOT NULL, peers TEXT, received REAL NOT NULL, path TEXT NOT NULL,
    merged_version INTEGER, staleness INTEGER, weight REAL);
CREATE TABLE IF NOT EXISTS refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, client_id TEXT, run_id TEXT,
    round INTEGER, reason TEXT NOT NULL, message TEXT, address TEXT);
CREATE TABLE IF NOT EXISTS refusal_counts (
    verified INTEGER NOT NULL, subject TEXT NOT NULL, reason TEXT NOT NULL, count INTEGER NOT NULL,
    last REAL NOT NULL, PRIMARY KEY (verified, subject, reason));
CREATE TABLE IF NOT EXISTS revoked_sessions (id TEXT PRIMARY KEY, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS audits (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, created REAL NOT NULL, report TEXT NOT NULL);
"""
# refusals.client_id: the verified sender (app/refusals.py); refusals.address: the source address of a
# refusal nobody's signature vouched for. refusal_counts aggregates both (verified = 1: subject is a client).


class Store:
    """All durable server state under one directory; safe to call from several threads."""

    def __init__(self, state_dir: str | Path):
        self.root = Path(state_dir)
        self.models_dir = self.root / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.offline_dir = self.root / "offline"  # offline contributions waiting to be merged
        self.offline_dir.mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._clients: dict[str, dict[str, Any]] = {}  # client(): registered clients as read, by id
        self._db = sqlite3.connect(self.root / "meshfed.sqlite3", check_same_thread=False,
                                   isolation_level=None)  # autocommit; transactions are explicit
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        if "address" not in {r["name"] for r in self._db.execute("PRAGMA table_info(refusals)")}:
            self._db.execute("ALTER TABLE refusals ADD COLUMN address TEXT")  # a state dir from meshfed/2
        if "from_version" not in {r["name"] for r in self._db.execute("PRAGMA table_info(runs)")}:
            self._db.execute("ALTER TABLE runs ADD COLUMN from_version INTEGER")  # a state dir from an older meshfed
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(rounds)")}
        for column in ("privacy", "secure", "dropped"):  # a state dir from an older meshfed
            if column not in columns:
                self._db.execute(f"ALTER TABLE rounds ADD COLUMN {column} TEXT")
        if "evaluated" not in columns:  # then, every round with an accuracy had been evaluated
            self._db.execute("ALTER TABLE rounds ADD COLUMN evaluated INTEGER")
            self._db.execute("UPDATE rounds SET evaluated = 1 WHERE accuracy IS NOT NULL")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def _execute(self, *statements: tuple[str, tuple]) -> None:
        """Run statements in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # --- runs ------------------------------------------------------------------------------------

    def create_run(self, run_id: str, config: dict[str, Any], from_version: int | None = None) -> None:
        """A new run; `from_version`: the model it continues from (None: its own initial model)."""
        self._execute(("INSERT INTO runs (id, config, status, created, from_version) VALUES (?, ?, 'running', ?, ?)",
                       (run_id, jsonio.dumps(config), time.time(), from_version)))

    def set_run_status(self, run_id: str, status: str, reason: str | None = None,
                       config: dict[str, Any] | None = None) -> None:
        """Set a run's status (and, when resuming with an edited configuration, its config)."""
        statements = [("UPDATE runs SET status = ?, stop_reason = ? WHERE id = ?", (status, reason, run_id))]
        if config is not None:
            statements.append(("UPDATE runs SET config = ? WHERE id = ?", (jsonio.dumps(config), run_id)))
        self._execute(*statements)

    def latest_run(self) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM runs ORDER BY created DESC, rowid DESC LIMIT 1")
        if not rows:
            return None
        rows[0]["config"] = json.loads(rows[0]["config"])
        return rows[0]

    def run(self, run_id: str) -> dict[str, Any] | None:
        """One run's row, its config decoded."""
        rows = self._query("SELECT * FROM runs WHERE id = ?", (run_id,))
        if not rows:
            return None
        rows[0]["config"] = json.loads(rows[0]["config"])
        return rows[0]

    def runs(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest runs first, for browsing their history: id, status, why it ended, rounds, when, what."""
        rows = self._query("SELECT id, config, status, stop_reason, completed_round, created, from_version FROM runs "
                           "ORDER BY created DESC, rowid DESC LIMIT ?", (limit,))
        for row in rows:
            config = json.loads(row.pop("config"))
            row.update(dataset=config.get("dataset"), model=config.get("model"), num_rounds=config.get("num_rounds"))
        return rows

    # --- model versions --------------------------------------------------------------------------

    def _write_model(self, version: int, data: bytes) -> tuple[str, str]:
        path = self.models_dir / f"v{version:06d}.safetensors"
        write_atomic(path, data)
        return path.name, sha256_hex(data)

    def next_version(self) -> int:
        rows = self._query("SELECT COALESCE(MAX(version), 0) AS v FROM model_versions")
        return int(rows[0]["v"]) + 1

    def add_version(self, data: bytes, source: str, run_id: str | None = None, parent: int | None = None,
                    accuracy: float | None = None, loss: float | None = None) -> int:
        """Store a model that no round produced (the initial model, a rollback); returns its version."""
        version = self.next_version()
        name, digest = self._write_model(version, data)
        self._execute(("INSERT INTO model_versions (version, run_id, round, source, parent, sha256, path, "
                       "accuracy, loss, created) VALUES (?, ?, NULL, ?, ?, ?, ?, ?, ?, ?)",
                       (version, run_id, source, parent, digest, name, accuracy, loss, time.time())))
        return version

    def write_checkpoint(self, data: bytes, state: bytes | None = None) -> Checkpoint:
        """Write the next version's model (and strategy state) files to disk; commit_round records them.
        A crash in between leaves files no row names: the next checkpoint of that version replaces them."""
        version = self.next_version()
        name, digest = self._write_model(version, data)
        state_name = None
        if state is not None:
            state_name = f"v{version:06d}.state.safetensors"
            write_atomic(self.models_dir / state_name, state)
        return Checkpoint(version, name, digest, state_name)

    def commit_round(self, run_id: str, round_no: int, checkpoint: Checkpoint, parent: int, row: dict[str, Any],
                     finished: str | None = None, merged: dict[str, tuple[int, float]] | None = None) -> int:
        """Durably record one completed round and the checkpoint it produced (write_checkpoint);
        returns the new version. Only the two newest state files are kept."""
        row = jsonio.finite(row)  # a NaN or infinity (a diverged loss) is stored as NULL
        version = checkpoint.version
        now = time.time()
        statements = [
            ("INSERT INTO model_versions (version, run_id, round, source, parent, sha256, path, accuracy, "
             "loss, created, state_path) VALUES (?, ?, ?, 'round', ?, ?, ?, ?, ?, ?, ?)",
             (version, run_id, round_no, parent, checkpoint.sha256, checkpoint.path, row["accuracy"], row["loss"], now,
              checkpoint.state_path)),
            ("INSERT OR REPLACE INTO rounds (run_id, round, model_version, accuracy, loss, num_clients, "
             "num_selected, num_refused, seconds, train_seconds, eval_seconds, ended, clients, timings, flagged, "
             "stragglers, privacy, secure, dropped, evaluated) "
             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
             (run_id, round_no, version, row["accuracy"], row["loss"], row["num_clients"], row["num_selected"],
              row["num_refused"], row["seconds"], row["train_seconds"], row["eval_seconds"], now,
              jsonio.dumps(row["clients"]), jsonio.dumps(row.get("timings", {})), jsonio.dumps(row.get("flagged", {})),
              jsonio.dumps(row.get("stragglers", {})), jsonio.dumps(row.get("privacy", {})),
              jsonio.dumps(row.get("secure", {})), jsonio.dumps(row.get("why_dropped", {})),
              None if row["accuracy"] is None else 1)),  # evaluated: pending until record_evaluation
            ("UPDATE runs SET completed_round = ? WHERE id = ?", (round_no, run_id)),
        ]
        # per-client outcomes in the round's own transaction (one fsync per round, not one per update)
        statements += [("UPDATE clients SET accepted = accepted + 1, last_round = ?, last_seen = ? WHERE id = ?",
                        (round_no, now, cid)) for cid in row["clients"]]
        statements += [("UPDATE clients SET flagged = flagged + 1 WHERE id = ?", (cid,))
                       for cid in row.get("flagged", {})]
        statements += [("UPDATE clients SET dropouts = dropouts + 1 WHERE id = ?", (cid,))
                       for cid in row.get("dropped", [])]
        statements += [("UPDATE contributions SET merged_version = ?, staleness = ?, weight = ? WHERE id = ?",
                        (version, staleness, weight, cid)) for cid, (staleness, weight) in (merged or {}).items()]
        if finished:
            statements.append(("UPDATE runs SET status = 'finished', stop_reason = ? WHERE id = ?",
                               (finished, run_id)))
        self._execute(*statements)
        for old in self.models_dir.glob("v*.state.safetensors"):
            if int(old.name[1:7]) < version - 1:
                old.unlink(missing_ok=True)
        return version

    def record_evaluation(self, run_id: str, round_no: int, version: int, row: dict[str, Any],
                          finished: str | None = None) -> None:
        """Add the test-split evaluation of a committed round, or that it had none (accuracy None: eval_every),
        and finish the run if it reached its target. A crash before this leaves the round committed with
        evaluated NULL; the resumed loop evaluates it."""
        row = jsonio.finite(row)
        statements = [
            ("UPDATE model_versions SET accuracy = ?, loss = ? WHERE version = ?",
             (row["accuracy"], row["loss"], version)),
            ("UPDATE rounds SET accuracy = ?, loss = ?, eval_seconds = ?, seconds = ?, timings = ?, evaluated = ? "
             "WHERE run_id = ? AND round = ?",
             (row["accuracy"], row["loss"], row["eval_seconds"], row["seconds"], jsonio.dumps(row.get("timings", {})),
              int(row["accuracy"] is not None), run_id, round_no))]
        if finished:
            statements.append(("UPDATE runs SET status = 'finished', stop_reason = ? WHERE id = ?", (finished, run_id)))
        self._execute(*statements)

    def read_state(self, version: int) -> bytes | None:
        """The strategy state saved with `version`, if any."""
        row = self.get_version(version)
        if row is None or not row.get("state_path"):
            return None
        path = self.models_dir / row["state_path"]
        return path.read_bytes() if path.exists() else None

    def latest_version(self) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM model_versions ORDER BY version DESC LIMIT 1")
        return rows[0] if rows else None

    def get_version(self, version: int) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM model_versions WHERE version = ?", (version,))
        return rows[0] if rows else None

    def versions(self) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM model_versions ORDER BY version")

    def read_model(self, version: int) -> bytes:
        """The checkpoint bytes of `version`, checked against the recorded sha256."""
        row = self.get_version(version)
        if row is None:
            raise KeyError(version)
        data = (self.models_dir / row["path"]).read_bytes()
        if sha256_hex(data) != row["sha256"]:
            raise OSError(f"checkpoint of version {version} is corrupt (sha256 mismatch)")
        return data

    # --- rounds ----------------------------------------------------------------------------------

    def rounds(self, run_id: str, evaluated_only: bool = True) -> list[dict[str, Any]]:
        """The run's rounds; by default only those done: evaluated, or not to be (eval_every: accuracy None).
        `evaluated`: 1, 0 (not this round), None (committed, its evaluation pending)."""
        where = " AND evaluated IS NOT NULL" if evaluated_only else ""
        rows = self._query(f"SELECT * FROM rounds WHERE run_id = ?{where} ORDER BY round", (run_id,))
        for r in rows:
            r["clients"] = json.loads(r["clients"] or "[]")
            r["timings"] = json.loads(r["timings"] or "{}")
            r["flagged"] = json.loads(r["flagged"] or "{}")
            r["stragglers"] = json.loads(r["stragglers"] or "{}")
            r["privacy"] = json.loads(r["privacy"] or "{}")  # epsilon per client (and the run's, dp 'client')
            r["secure"] = json.loads(r["secure"] or "{}")    # a secure round's stages (app/secagg.py)
            r["why_dropped"] = json.loads(r.pop("dropped") or "{}")  # asked, not delivered: client id -> why
            r["dropped"] = sorted(r["why_dropped"])
        return rows

    # --- clients ---------------------------------------------------------------------------------

    def pin_client(self, client_id: str, public_key: str, fingerprint: str, num_examples: int) -> bool:
        """Pin the key on first registration; refuse a different key later. True if newly pinned."""
        with self._lock:
            row = self._db.execute("SELECT public_key FROM clients WHERE id = ?", (client_id,)).fetchone()
            if row is not None and row["public_key"].strip() != public_key.strip():
                raise RegistrationRefused(
                    "key_mismatch", f"client id {client_id!r} is pinned to another key; use its original key, "
                                    "or ask the operator to remove the client")
            self._clients.pop(client_id, None)
            self._db.execute(
                "INSERT INTO clients (id, public_key, fingerprint, registered, last_seen, num_examples) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET last_seen = excluded.last_seen, "
                "num_examples = excluded.num_examples",
                (client_id, public_key, fingerprint, time.time(), time.time(), num_examples))
            return row is None

    def client(self, client_id: str) -> dict[str, Any] | None:
        """The registered client's pinned key and registered example count, or None. Kept in memory once read:
        every update asks (its signature's key), and a query each cost 8% of the server's interpreter time with
        1,000 clients (bench/swarm.py). Only registered ids are kept; pin_client and set_examples forget theirs."""
        with self._lock:
            if (known := self._clients.get(client_id)) is None:
                row = self._db.execute("SELECT id, public_key, fingerprint, num_examples FROM clients WHERE id = ?",
                                       (client_id,)).fetchone()
                if row is None:
                    return None
                known = self._clients[client_id] = dict(row)
            return dict(known)

    def set_examples(self, client_id: str, num_examples: int) -> None:
        """A connected client re-partitioned: its registered example count changes (over its own session)."""
        self._execute(("UPDATE clients SET num_examples = ? WHERE id = ?", (num_examples, client_id)))
        with self._lock:
            self._clients.pop(client_id, None)

    def record_accepted(self, client_id: str) -> None:
        """An accepted offline contribution (round updates are counted with their round, commit_round)."""
        self._execute(("UPDATE clients SET accepted = accepted + 1, last_seen = ? WHERE id = ?",
                       (time.time(), client_id)))

    def record_refusals(self, counts: dict[tuple[bool, str, str], int], recent: list[Any],
                        max_addresses: int, keep: int) -> None:
        """Add aggregated refusal counts ((verified, client or address, reason) -> n) and the recent
        refusals (app/refusals.Refusal) in one transaction; keep `keep` recent rows, `max_addresses` addresses."""
        now = time.time()
        statements = [("INSERT INTO refusal_counts (verified, subject, reason, count, last) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT (verified, subject, reason) DO UPDATE SET count = count + excluded.count, "
                       "last = excluded.last", (int(verified), subject, reason, n, now))
                      for (verified, subject, reason), n in counts.items()]
        per_client: Counter[str] = Counter()
        for (verified, subject, _), n in counts.items():
            if verified:
                per_client[subject] += n
        statements += [("UPDATE clients SET refused = refused + ? WHERE id = ?", (n, cid))
                       for cid, n in per_client.items()]
        statements += [("INSERT INTO refusals (time, client_id, address, run_id, round, reason, message) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", (r.time, r.client_id, r.address, r.run_id, r.round, r.reason,
                                                         r.message[:500])) for r in recent]
        statements.append(("DELETE FROM refusals WHERE id <= (SELECT MAX(id) FROM refusals) - ?", (keep,)))
        statements.append(("DELETE FROM refusal_counts WHERE verified = 0 AND subject NOT IN (SELECT subject FROM "
                           "refusal_counts WHERE verified = 0 GROUP BY subject ORDER BY MAX(last) DESC LIMIT ?)",
                           (max_addresses,)))
        self._execute(*statements)

    def client_count(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM clients")[0]["n"])

    def clients(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT id, fingerprint, registered, last_seen, num_examples, last_round, accepted, "
                           "refused, flagged, dropouts FROM clients ORDER BY id")
        reasons: dict[str, dict[str, int]] = {}
        for x in self._query("SELECT subject, reason, count FROM refusal_counts WHERE verified = 1"):
            reasons.setdefault(x["subject"], {})[x["reason"]] = x["count"]
        for r in rows:
            r["refusals"] = reasons.get(r["id"], {})
            # reputation in [0, 1]: share of clean outcomes (accepted and not flagged) among all the
            # client's outcomes (accepted, refused, dropped out), with one good and one bad pseudo-count
            clean, total = r["accepted"] - r["flagged"], r["accepted"] + r["refused"] + r["dropouts"]
            r["reputation"] = round((clean + 1) / (total + 2), 4)
        return rows

    # --- offline contributions (mesh sync-back) ---------------------------------------------------

    def add_contribution(self, header: Any, payload: bytes) -> bool:
        """Keep an offline contribution until a round merges it; False if its id was seen before. The file
        is named by client and id, so another client's upload with the same id cannot overwrite it."""
        if self._query("SELECT 1 FROM contributions WHERE id = ?", (header.contribution_id,)):
            return False
        key = f"{header.client_id}/{header.contribution_id}".encode()
        name = f"{hashlib.sha256(key).hexdigest()[:32]}.safetensors"
        write_atomic(self.offline_dir / name, payload)
        try:
            self._execute(("INSERT INTO contributions (id, client_id, base_version, local_steps, num_examples, "
                           "peers, received, path) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (header.contribution_id, header.client_id, header.base_version, header.local_steps,
                            header.num_examples, jsonio.dumps(header.peers), time.time(), name)))
        except sqlite3.IntegrityError:  # the same id, concurrently: keep the file only if that row names it
            winner = self.contribution(header.contribution_id)
            if winner is None or winner["path"] != name:
                (self.offline_dir / name).unlink(missing_ok=True)
            return False
        return True

    def count_contributions(self, client_id: str, base_version: int) -> int:
        rows = self._query("SELECT COUNT(*) AS n FROM contributions WHERE client_id = ? AND base_version = ?",
                           (client_id, base_version))
        return int(rows[0]["n"])

    def contribution(self, contribution_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM contributions WHERE id = ?", (contribution_id,))
        return rows[0] if rows else None

    def contributions(self, pending_only: bool = False, limit: int = 200) -> list[dict[str, Any]]:
        where = "WHERE merged_version IS NULL" if pending_only else ""
        rows = self._query(f"SELECT * FROM contributions {where} ORDER BY received LIMIT ?", (limit,))
        for row in rows:
            row["peers"] = json.loads(row["peers"] or "[]")
        return rows

    def read_contribution(self, row: dict[str, Any]) -> bytes:
        return (self.offline_dir / row["path"]).read_bytes()

    def refusal_counts(self) -> dict[tuple[bool, str], int]:
        """(verified, reason) -> refusals so far (verified: charged to a client whose signature checked out)."""
        return {(bool(r["verified"]), r["reason"]): r["n"] for r in self._query(
            "SELECT verified, reason, SUM(count) AS n FROM refusal_counts GROUP BY verified, reason")}

    def address_refusals(self, limit: int = 20) -> list[dict[str, Any]]:
        """The source addresses with the most unverified refusals: {address, refusals: {reason: n}, last}."""
        rows = self._query("SELECT subject, reason, count, last FROM refusal_counts WHERE verified = 0 AND subject IN "
                           "(SELECT subject FROM refusal_counts WHERE verified = 0 GROUP BY subject "
                           "ORDER BY SUM(count) DESC LIMIT ?)", (limit,))
        by_address: dict[str, dict[str, Any]] = {}
        for r in rows:
            entry = by_address.setdefault(r["subject"], {"address": r["subject"], "refusals": {}, "last": 0.0})
            entry["refusals"][r["reason"]] = r["count"]
            entry["last"] = max(entry["last"], r["last"])
        return sorted(by_address.values(), key=lambda e: -sum(e["refusals"].values()))

    def refusals(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM refusals ORDER BY id DESC LIMIT ?", (limit,))

    # --- privacy audits (bench/privacy_audit.py posts them) ---------------------------------------

    def add_audit(self, run_id: str | None, report: dict[str, Any]) -> None:
        self._execute(("INSERT INTO audits (run_id, created, report) VALUES (?, ?, ?)",
                       (run_id, time.time(), jsonio.dumps(report))))

    def latest_audit(self, run_id: str | None) -> dict[str, Any] | None:
        rows = self._query("SELECT report, created FROM audits WHERE run_id IS ? ORDER BY id DESC LIMIT 1", (run_id,))
        return {**json.loads(rows[0]["report"]), "created": rows[0]["created"]} if rows else None

    # --- dashboard sessions ----------------------------------------------------------------------

    def revoke_session(self, session_id: str, expires: float) -> None:
        self._execute(("INSERT OR REPLACE INTO revoked_sessions (id, expires) VALUES (?, ?)", (session_id, expires)),
                      ("DELETE FROM revoked_sessions WHERE expires < ?", (time.time(),)))

    def revoked_sessions(self) -> set[str]:
        return {r["id"] for r in self._query("SELECT id FROM revoked_sessions WHERE expires >= ?", (time.time(),))}
