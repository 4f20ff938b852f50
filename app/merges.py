"""Deltas that join an aggregation besides its round's fresh updates: stragglers (late updates from clients a
closed round asked) and offline contributions from the mesh (kept in the store until a round merges them).

One policy for both (FedAsync / FedBuff-style): weight n / sqrt(1 + staleness), staleness being the model
versions the global model moved since the delta's base; each delta clipped to the median norm of the round's
fresh updates; one client's merges in a round weigh at most its registered examples; a client makes at most
MAX_CONTRIBUTIONS_PER_BASE offline contributions from one base version. Robust rules see them as rows like any
update. Offline contributions are checked whole before anything is written, and idempotent by their id.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.store import Store
from app.verify import OpenRound, Verified, check_arrays, check_examples, check_round
from shared.aggregate import cap_total, clip_to_norm, staleness_weight
from shared.errors import UpdateRefused
from shared.protocol import SyncHeader, UpdateHeader, encode_weights

log = logging.getLogger("meshfed.merges")
MAX_CONTRIBUTIONS_PER_BASE = 1
Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class Pending:
    """A delta waiting to join the next aggregation."""

    client_id: str
    delta: Weights
    num_examples: int
    base_version: int          # the global version it was trained from
    cap: int                   # the client's registered examples: its merges' total weight per round
    contribution_id: str = ""  # an offline contribution's id ("" for a straggler)
    round: int = 0             # a straggler's round


@dataclass
class Taken:
    """The merges of one aggregation: (delta, weight, key) to add, and what to record."""

    merges: list[tuple[Weights, float, str]] = field(default_factory=list)
    contributions: dict[str, tuple[int, float]] = field(default_factory=dict)  # id -> (staleness, weight)
    stragglers: dict[str, dict[str, Any]] = field(default_factory=dict)       # client -> round, staleness, merged
    late: list[Pending] = field(default_factory=list)                          # given back on a retry
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)              # given back on a retry


class PendingMerges:
    def __init__(self, store: Store, max_bytes: int):
        self.store, self.max_bytes = store, max_bytes
        self._lock = threading.Lock()
        self._closed: dict[int, tuple[OpenRound, set[str]]] = {}  # round -> (what it took, who delivered or was late)
        self._late: list[Pending] = []                            # stragglers to merge
        self._seen: dict[str, dict[str, Any]] = {}                # stragglers since the last aggregation

    def reset(self) -> None:
        """A run starts: nothing of the last one is late for it."""
        with self._lock:
            self._closed, self._late, self._seen = {}, [], {}

    # --- stragglers ----------------------------------------------------------------------------------------

    def round_closed(self, open_round: OpenRound, delivered: set[str], max_staleness: int) -> None:
        with self._lock:
            self._closed[open_round.round] = (open_round, set(delivered))
            for old in [r for r in self._closed if r <= open_round.round - max_staleness]:
                del self._closed[old]

    def late_round(self, header: UpdateHeader, open_round: int | None) -> OpenRound | None:
        """The closed round this update is late for, or None (not late: the open round checks it)."""
        with self._lock:
            closed = self._closed.get(header.round)
            if closed is None or header.client_id in closed[1] or open_round == header.round:
                return None  # unknown, already counted there, or being played again: the open round's
            return closed[0]

    def offer_straggler(self, update: Verified, late: OpenRound, merge: bool) -> str:
        """Record a late update of an asked client; keep it for the next aggregation if `merge`."""
        header = update.header
        assert isinstance(header, UpdateHeader)
        check_examples(header.num_examples, update.registered_examples)
        check_round(header, late, set())  # run, version, asked: as in its own round
        delta = check_arrays(update.payload, late.spec, late.max_bytes, late.compression, late.topk_ratio)
        with self._lock:
            closed = self._closed.get(header.round)
            if closed is None or header.client_id in closed[1]:
                raise UpdateRefused("stale_round", f"round {header.round} no longer takes late updates")
            closed[1].add(header.client_id)
            if merge:
                self._late.append(Pending(header.client_id, delta, header.num_examples, header.model_version,
                                          update.registered_examples, round=header.round))
            self._seen[header.client_id] = {"round": header.round, "base_version": header.model_version,
                                            "merged": merge}
        log.info("straggler from %s for round %d: %s", header.client_id, header.round,
                 "merged into the next aggregation" if merge else "dropped")
        return "straggler_merged" if merge else "straggler_dropped"

    # --- offline contributions -----------------------------------------------------------------------------

    def offer_contribution(self, contribution: Verified, spec: dict) -> dict[str, Any]:
        """Keep a verified offline contribution for the next aggregation; refusals raise UpdateRefused."""
        header = contribution.header
        assert isinstance(header, SyncHeader)
        known = self.store.contribution(header.contribution_id)
        if known is not None:
            if known["client_id"] != header.client_id:
                raise UpdateRefused("replay", "that contribution id belongs to another client")
            return {"accepted": True, "duplicate": True, "merged_version": known["merged_version"]}
        check_examples(header.num_examples, contribution.registered_examples)
        if self.store.get_version(header.base_version) is None:
            raise UpdateRefused("wrong_version", f"base version {header.base_version} is not stored here")
        made = self.store.count_contributions(header.client_id, header.base_version)
        if made >= MAX_CONTRIBUTIONS_PER_BASE:
            raise UpdateRefused("contribution_limit", f"{header.client_id!r} already made {made} contribution(s) "
                                                      f"from version {header.base_version}; train from a newer one")
        delta = check_arrays(contribution.payload, spec, self.max_bytes, header.compression)
        # kept as float32 (its signed bytes were checked above): merging reads every contribution the same way
        duplicate = not self.store.add_contribution(header, contribution.payload if header.compression == "none"
                                                    else encode_weights(delta))
        if not duplicate:
            self.store.record_accepted(header.client_id)
            log.info("offline contribution %s from %s: base v%d, %d local steps, mixed with %s; merged with the "
                     "next aggregation", header.contribution_id[:8], header.client_id, header.base_version,
                     header.local_steps, ", ".join(header.peers) or "nobody")
        return {"accepted": True, "duplicate": duplicate, "merged_version": None}

    def _offline(self, spec: dict) -> list[Pending]:
        """Stored offline contributions that fit the current model."""
        pending = []
        for row in self.store.contributions(pending_only=True):
            try:
                delta = check_arrays(self.store.read_contribution(row), spec, self.max_bytes)
            except (UpdateRefused, OSError) as exc:  # e.g. a new run with another model: stays pending, visible
                log.warning("offline contribution %s cannot be merged into this model: %s", row["id"][:8], exc)
                continue
            client = self.store.client(row["client_id"])
            pending.append(Pending(row["client_id"], delta, row["num_examples"], row["base_version"],
                                   int(client["num_examples"] or 0) if client else 0, row["id"]))
        return pending

    # --- one aggregation's merges --------------------------------------------------------------------------

    def take(self, version: int, spec: dict, max_norm: float, offline: bool = True) -> Taken:
        """Everything pending for an aggregation from global `version`, weighted, clipped to max_norm and capped
        per client (a merge whose client registered no examples weighs nothing and is left out). offline=False
        leaves offline contributions pending (a private run: what the mesh learned was not trained privately)."""
        with self._lock:
            late, seen, self._late, self._seen = self._late, self._seen, [], {}
        pending = late + (self._offline(spec) if offline else [])
        weights = [staleness_weight(p.num_examples, version - p.base_version) for p in pending]
        for client in {p.client_id for p in pending}:
            mine = [i for i, p in enumerate(pending) if p.client_id == client]
            for i, w in zip(mine, cap_total([weights[i] for i in mine], pending[mine[0]].cap)):
                weights[i] = w
        taken = Taken(late=late, seen=seen)
        taken.stragglers = {cid: {"round": s["round"], "staleness": version - s["base_version"], "merged": s["merged"]}
                            for cid, s in seen.items()}
        for p, w in zip(pending, weights):
            if p.contribution_id:
                taken.contributions[p.contribution_id] = (version - p.base_version, w)
            if w > 0:
                key = "~offline/" + p.contribution_id if p.contribution_id else "~late/" + p.client_id
                taken.merges.append((clip_to_norm(p.delta, max_norm), w, key))
        return taken

    def give_back(self, taken: Taken) -> None:
        """The aggregation failed (e.g. Krum with too few updates): its stragglers wait for the next try (offline
        contributions stay in the store anyway)."""
        with self._lock:
            self._late = taken.late + self._late
            self._seen = {**taken.seen, **self._seen}

    def view(self) -> dict[str, Any]:
        """Offline contributions and who gossiped with whom (the dashboard's mesh panel, GET /api/mesh)."""
        rows = self.store.contributions()
        edges = sorted({tuple(sorted((r["client_id"], p))) for r in rows for p in r["peers"]})
        return {"contributions": [{k: r[k] for k in ("id", "client_id", "base_version", "local_steps",
                                                     "num_examples", "peers", "received", "merged_version",
                                                     "staleness", "weight")} for r in rows],
                "edges": [list(e) for e in edges]}
