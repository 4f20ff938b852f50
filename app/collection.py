"""Collecting rounds: the open round's updates, and late ones for rounds already closed.

Request threads offer() verified updates; the loop open()s a round, wait()s until it may close, and close()s it.
An accepted update goes straight into the round's accumulator (a running sum for FedAvg-family rules,
shared/accumulator.py), so a round holds O(d) memory whatever the number of clients; what stays per client is
its Arrival: examples, norm, alignment with the last step, and its advisory metrics. An update for a round that
closed without it is a straggler, handed to PendingMerges (app/merges.py). In an edge tier (app/tier.py) the
leader's collection also counts the updates its edges took, and adds each edge's partial sum when the round closes;
an edge's collection has no PendingMerges: a late update is refused there.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from app.merges import PendingMerges
from app.tier import LeaderTier, Partial, finite_or_none
from app.verify import SECURE, OpenRound, Verified, check_arrays, check_examples, check_round
from shared import secagg
from shared.accumulator import Accumulator, WeightedSum
from shared.aggregate import dot, update_norm
from shared.errors import UpdateRefused
from shared.protocol import UpdateHeader

if TYPE_CHECKING:
    from app.config import RunConfig

log = logging.getLogger("meshfed.collection")


@dataclass(frozen=True)
class Arrival:
    """What the server keeps of one accepted update once its delta is in the accumulator."""

    client_id: str
    num_examples: int
    norm: float                # L2 norm of the delta: anomaly scores, the clipping bound of late deltas
    dot: float                 # <delta, the previous round's step>: its alignment, for the anomaly scores
    metrics: dict[str, float]  # the client's advisory metrics, plus arrived (monotonic) and payload_bytes
    epsilon: float = 0.0       # the privacy the client signed it had spent in the run (dp 'sample', 'local')


def _number(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) else math.nan


def arrival_json(a: Arrival) -> dict[str, Any]:
    """An edge's arrival as it hands it to the leader: its age instead of its monotonic time (another clock)."""
    return {"client_id": a.client_id, "num_examples": a.num_examples, "norm": finite_or_none(a.norm),
            "dot": finite_or_none(a.dot), "epsilon": a.epsilon,
            "metrics": {k: v for k, v in a.metrics.items() if k != "arrived" and math.isfinite(v)},
            "age": time.monotonic() - a.metrics.get("arrived", time.monotonic())}


def clients_to_wait_for(cfg: "RunConfig") -> int:
    """A round starts once this many clients are connected: min_available_clients, and never fewer than it asks."""
    return max(cfg.min_available_clients, cfg.min_fit_clients)


def select_clients(online: list[str], cfg: "RunConfig", run_id: str, round_no: int) -> list[str]:
    """The clients asked in a round: fraction_fit of those online, at least min_fit_clients, at most
    max_fit_clients, sampled uniformly with the run's seed (as Flower's min_available_clients, fraction_fit and
    min_fit_clients: wait for 100, ask 10)."""
    k = max(cfg.min_fit_clients, math.ceil(cfg.fraction_fit * len(online)))
    if cfg.max_fit_clients:
        k = min(k, cfg.max_fit_clients)
    rng = random.Random(f"{cfg.seed}/{run_id}/{round_no}")
    return sorted(rng.sample(online, min(k, len(online))))


class Collection:
    """Thread-safe: offer() from request threads, open/wait/close from the loop."""

    def __init__(self, merges: PendingMerges | None, tier: LeaderTier | None = None,
                 claim: Callable[[UpdateHeader], None] | None = None):
        self.merges, self.tier = merges, tier
        self.claim = claim or (tier.claim if tier else None)  # in a tier: one update a client and round, anywhere
        self._cond = threading.Condition()
        self._round: OpenRound | None = None  # None while no round is open
        self._accumulator: Accumulator | None = None
        self._step: dict[str, np.ndarray] = {}  # the previous round's step (empty in a run's first round)
        self._arrivals: dict[str, Arrival] = {}
        self._remote: set[str] = set()  # asked clients whose update an edge took (the tier), for the wait
        self._adding: set[str] = set()  # verified and checked, their deltas going into the accumulator
        self._gone: set[str] = set()
        self._why: dict[str, str] = {}  # why an asked client will not deliver (disconnected, refused...)
        self._refusals = 0  # verified refusals of the open round (its telemetry)
        self._deadline_at: float | None = None  # the open round's deadline, wall clock (time.time())
        self._secure_weights: dict[str, int] = {}  # a secure round's roster: who may send input, weighing what

    def open(self, open_round: OpenRound, accumulator: Accumulator, step: dict[str, np.ndarray],
             deadline_at: float | None = None) -> None:
        """Take updates for `open_round` into `accumulator`; `deadline_at` (wall clock) is shown to dashboards."""
        with self._cond:
            self._deadline_at = deadline_at
            self._round, self._accumulator, self._step = open_round, accumulator, step
            self._arrivals, self._gone, self._refusals, self._secure_weights = {}, set(), 0, {}
            self._why, self._remote = {}, set()
        if self.tier is not None:
            self.tier.announce(open_round, shardable=type(accumulator) is WeightedSum)

    def offer(self, update: Verified, merge_stragglers: bool) -> str:
        """Add a verified update to the open round ('accepted'), or take it as a straggler of a closed round;
        UpdateRefused (nothing added) otherwise."""
        header = update.header
        cpu = time.thread_time()  # this update's decoding, checks and accumulation (bench/compression.py)
        with self._cond:  # whether this client delivered, not a copy of who did (O(1) an update, not O(clients))
            r, accumulator, step = self._round, self._accumulator, self._step
            delivered = {header.client_id} if header.client_id in self._arrivals else set()
        late = self.merges.late_round(header, r.round if r else None) if self.merges else None
        if late is not None:
            return self.merges.offer_straggler(update, late, merge_stragglers)
        check_examples(header.num_examples, update.registered_examples)
        check_round(header, r, delivered)
        if self.claim is not None:
            self.claim(header)
        delta = check_arrays(update.payload, r.spec, r.max_bytes, r.compression, r.topk_ratio)
        if r.compression == SECURE:  # masked: its norm is noise; its weight is the one the roster announced
            if header.num_examples != self._secure_weights.get(header.client_id):
                raise UpdateRefused("bad_examples", f"a secure round weighs {header.client_id!r} by the "
                                                    f"{self._secure_weights.get(header.client_id)} examples its "
                                                    f"roster announced, got {header.num_examples}")
            norm, alignment = math.nan, math.nan
            secagg.audit(f"{header.run_id}-{header.round}-{header.client_id}.masked",
                         lambda: secagg.flatten(delta, dict(sorted(r.spec.items()))))
        else:
            norm, alignment = update_norm(delta), dot(delta, step)  # while the delta is in the CPU cache
        with self._cond:  # the round may have closed, or the client delivered, while we decoded
            busy = header.client_id in self._arrivals or header.client_id in self._adding
            check_round(header, self._round if self._round is r else None, {header.client_id} if busy else set())
            self._adding.add(header.client_id)  # close() waits for it; a second copy is a replay
        try:  # outside the lock: other updates decode meanwhile (the accumulator has a lock of its own)
            accumulator.add(delta, header.num_examples, key=header.client_id)
        except BaseException:
            self._added(header.client_id, None)
            raise
        self._added(header.client_id, Arrival(
            header.client_id, header.num_examples, norm, alignment,
            {**header.metrics, "arrived": time.monotonic(), "payload_bytes": len(update.payload),
             "server_cpu_seconds": time.thread_time() - cpu}, header.epsilon))
        return "accepted"

    def _added(self, client_id: str, arrival: Arrival | None) -> None:
        with self._cond:
            self._adding.discard(client_id)
            if arrival is not None:
                self._arrivals[client_id] = arrival
            self._cond.notify_all()

    def remote_arrived(self, run_id: str, round_no: int, client_id: str) -> None:
        """An edge took an asked client's update for the open round (app/tier.py): stop waiting for it."""
        with self._cond:
            r = self._round
            if r is not None and (r.run_id, r.round) == (run_id, round_no) and client_id in r.selected:
                self._remote.add(client_id)
                self._cond.notify_all()

    def admit(self, weights: dict[str, int]) -> None:
        """A secure round opens with nobody selected (app/rounds.py); once its keys are shared, the clients that
        shared them may send their masked inputs, each weighing what the roster said."""
        with self._cond:
            if self._round is not None:
                self._round = dataclasses.replace(self._round, selected=frozenset(weights))
                self._secure_weights = dict(weights)
            self._cond.notify_all()

    def gone(self, client_ids: set[str], why: str) -> None:
        """These asked clients will not deliver (`why`: disconnected, never reached...): stop waiting for them."""
        with self._cond:
            self._gone |= client_ids
            for cid in client_ids:
                self._why.setdefault(cid, why)
            self._cond.notify_all()

    def refused(self, round_no: int | None, client_id: str, reason: str = "refused") -> None:
        """A verified update for `round_no` was refused. If it was an asked client's for the open round, it will
        not deliver one (clients do not resend): stop waiting for it, as for a client that left, rather than
        hold the round until its deadline."""
        with self._cond:
            if self._round is not None and round_no == self._round.round:
                self._refusals += 1
                if client_id in self._round.selected and client_id not in self._arrivals \
                        and client_id not in self._adding:
                    self._gone.add(client_id)
                    self._why.setdefault(client_id, f"its update was refused ({reason})")
                    self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait(self, deadline: float, min_updates: int, stop: threading.Event) -> None:
        """Until every asked client delivered or is gone, min_updates arrived (if set), the deadline, or stop."""
        with self._cond:
            while not stop.is_set() and self._round is not None:
                selected = self._round.selected  # each arrival wakes this: the O(clients) set difference only once
                # the counts allow that nobody is pending (arrivals are asked clients; gone may hold others)
                arrived = len(self._arrivals) + len(self._remote)  # disjoint: the tier claims each delivery once
                done = arrived + len(self._gone) >= len(selected) and \
                    not selected - self._arrivals.keys() - self._remote - self._gone
                enough = min_updates and arrived >= min_updates
                if done or enough or time.monotonic() >= deadline:
                    return
                self._cond.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))

    def why(self) -> dict[str, str]:
        """Why asked clients of the open (or last closed) round stopped being waited for, as far as known."""
        with self._cond:
            return dict(self._why)

    def close(self, max_staleness: int) -> tuple[list[Arrival], Accumulator, int]:
        """Stop taking updates for the open round (later ones are stragglers): its arrivals in client id order,
        its accumulator, its refusals."""
        with self._cond:
            r, self._round = self._round, None  # no update is taken from here on
            while self._adding:  # those already checked finish their additions
                self._cond.wait()
            arrivals, accumulator, refusals = dict(self._arrivals), self._accumulator, self._refusals
            self._accumulator, remote = None, set(self._remote)
        if self.tier is not None and r is not None:  # each edge's partial sum: one more add()
            for partial in self.tier.gather(r):
                self._combine(partial, accumulator, arrivals)
            lost = sorted(remote - arrivals.keys())
            with self._cond:
                for cid in lost:
                    self._why.setdefault(cid, "its update was lost with its edge")
        if self.merges is not None:
            self.merges.round_closed(r, set(arrivals), max_staleness)
        return [arrivals[cid] for cid in sorted(arrivals)], accumulator, refusals

    @staticmethod
    def _combine(partial: Partial, accumulator: Accumulator, arrivals: dict[str, Arrival]) -> None:
        """Add an edge's partial sum to the round's accumulator, and its updates to the round's arrivals (a client
        the round already has is a bug at an edge: that edge's whole sum is left out rather than counted twice)."""
        received = [Arrival(a["client_id"], int(a["num_examples"]), _number(a.get("norm")), _number(a.get("dot")),
                            {**a.get("metrics", {}), "arrived": time.monotonic() - float(a.get("age", 0.0))},
                            float(a.get("epsilon") or 0.0)) for a in partial.arrivals]
        if partial.mean is None or not received:
            return
        if any(a.client_id in arrivals for a in received) or len({a.client_id for a in received}) < len(received):
            log.error("edge %s handed over updates the round already has; its partial sum is left out", partial.edge)
            return
        accumulator.add(partial.mean, partial.total, key=f"edge {partial.edge}")
        arrivals.update({a.client_id: a for a in received})

    def view(self) -> dict[str, Any] | None:
        with self._cond:
            r = self._round
            return None if r is None else {"round": r.round, "selected": sorted(r.selected),
                                           "delivered": sorted(self._arrivals), "deadline_at": self._deadline_at,
                                           "deadline_in": None if self._deadline_at is None else
                                           max(0.0, self._deadline_at - time.time()),
                                           "gone": dict(self._why)}
