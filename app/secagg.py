"""Secure aggregation on the server: the stages of one round (Bonawitz et al. 2017; SecAgg+'s neighbourhoods,
Bell et al. 2020), driven by the round loop over the existing transport. The server learns the sum of the
round's inputs and nothing about any one of them.

  1. keys     each asked client sends two X25519 public keys (mask key, share key) and a commitment to its
              self-mask seed, signed with its pinned RSA key (checked here, and by its neighbours)
  2. shares   the server sends each client its neighbours' signed keys (the roster); each Shamir-shares its
              mask key and self-mask seed among its neighbours, sealed for each (AES-GCM), and the server
              routes them. Those who shared (U2) are the round's secure set: only they may send input
  3. inputs   each trains, quantises its weighted update into Z_{2^32}, adds its masks, signs and posts it to
              /api/update as any update; the Collection adds it to a RingSum (shared/accumulator.py)
  4. reveal   the survivors (who sent input, U3) are told who survived and who dropped; each reveals its
              shares of the survivors' self-mask seeds and of the dropped clients' mask keys, never both for
              one client. The server reconstructs them (checking each against what its owner signed), removes
              the masks, and dequantises the sum into the survivors' example-weighted mean

Stage deadlines come from the round's: keys by 10% of round_timeout, shares by 20%, inputs by the round
deadline, reveals within 10% more. A stage that ends with too few clients (a neighbourhood below its
threshold) abandons the round with the reason; the loop plays it again. Nothing is ever aggregated wrong: a
reconstructed secret that does not match its owner's signed key or commitment abandons the round too.

Weights travel signed, not masked: each input is n_u / W times the client's update (W the round's total
registered examples, sent in the roster), and n_u is the example count the client registered with, which the
server already knows and bounds (app/verify.py). Masking it would hide nothing, and a signed count keeps the
rule that nothing unsigned steers the model.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from shared import crypto, secagg
from shared.accumulator import RingSum

log = logging.getLogger("meshfed.secagg")
MODES = ("none", "secagg+")


class Abandoned(Exception):
    """The secure round cannot complete correctly (too few clients at a stage, a secret that does not check)."""


@dataclass
class SecureRound:
    """The server's state of one secure round (its inputs live in the Collection's RingSum)."""

    run_id: str
    round: int
    selected: list[str]
    weights: dict[str, int]       # each asked client's registered examples: n_u
    clip: float
    fraction: float
    k: int                        # neighbours asked for (0 = auto)
    started: float
    timeout: float
    stage: str = "keys"
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    shares: dict[str, dict[str, str]] = field(default_factory=dict)
    reveals: dict[str, dict[str, Any]] = field(default_factory=dict)
    graph: dict[str, list[str]] = field(default_factory=dict)
    xs: dict[str, int] = field(default_factory=dict)        # each client's share coordinate
    u2: list[str] = field(default_factory=list)
    survivors: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=lambda: {"bytes": {}, "seconds": {}})
    sum: dict[str, np.ndarray] | None = None  # the unmasked ring sum, once unmasked (only the sum is ever seen)

    @property
    def context(self) -> str:
        return f"{self.run_id}/{self.round}"

    def threshold(self, owner: str) -> int:
        return secagg.default_threshold(len(self.graph[owner]) + 1, self.fraction)

    def count(self, what: str, n: int) -> None:
        self.stats["bytes"][what] = self.stats["bytes"].get(what, 0) + n


class SecureAggregation:
    """Thread-safe: receive() from Socket.IO handler threads, the stages from the round loop."""

    def __init__(self, public_key_of: Callable[[str], str | None], send: Callable[[str, dict[str, Any]], bool]):
        self.public_key_of, self.send = public_key_of, send
        self._cond = threading.Condition()
        self._round: SecureRound | None = None
        self.abandoned = 0  # secure rounds abandoned since the server started (/metrics)

    # --- what clients send ---------------------------------------------------------------------------------

    def receive(self, client_id: str, raw: Any, size: int) -> dict[str, Any]:
        """A stage message from connected client `client_id`: checked, verified and kept, or refused with why."""
        try:
            message = secagg.check_message(raw)
            if message["client_id"] != client_id:
                raise secagg.SecAggError(f"message names {message['client_id']!r}; this session is {client_id!r}")
            pem = self.public_key_of(client_id)
            if pem is None or not crypto.verify(crypto.load_public_key(pem), secagg.signed_bytes(message),
                                                message["signature"]):
                raise secagg.SecAggError("signature does not verify against the client's pinned key")
            with self._cond:
                self._keep(self._round, message, size)
                self._cond.notify_all()
        except secagg.SecAggError as exc:
            log.warning("secure aggregation: refused a %s message from %s: %s",
                        str(raw.get("stage"))[:16] if isinstance(raw, dict) else "?", client_id, exc)
            return {"accepted": False, "reason": str(exc)}
        except Exception:  # a bug must not leave the client without an answer
            log.exception("secure aggregation: a message from %s failed", client_id)
            return {"accepted": False, "reason": "server_error: see the server log"}
        return {"accepted": True}

    @staticmethod
    def _keep(r: SecureRound | None, message: dict[str, Any], size: int) -> None:
        stage, cid = message["stage"], message["client_id"]
        if r is None or (message["run_id"], message["round"]) != (r.run_id, r.round):
            raise secagg.SecAggError("no secure round is open for this run and round")
        if stage == "keys":
            if r.stage != "keys" or cid not in r.weights:
                raise secagg.SecAggError("keys are taken from the asked clients while the round sets up")
            if cid in r.keys:
                raise secagg.SecAggError("keys already sent for this round")
            r.keys[cid] = message
        elif stage == "shares":
            if r.stage != "shares" or cid not in r.graph:
                raise secagg.SecAggError("shares are taken from clients on the roster, after it was sent")
            if cid in r.shares:
                raise secagg.SecAggError("shares already sent for this round")
            if set(message["shares"]) != set(r.graph[cid]):
                raise secagg.SecAggError("shares must be addressed to exactly the client's neighbours")
            r.shares[cid] = message["shares"]
        else:
            if r.stage != "reveal" or cid not in r.survivors:
                raise secagg.SecAggError("reveals are taken from the round's survivors once asked")
            if cid in r.reveals:
                raise secagg.SecAggError("already revealed for this round")
            holds = set(r.graph[cid]) | {cid}
            if not set(message["self_mask"]) <= holds & set(r.survivors) or \
                    not set(message["mask_key_shares"]) <= holds & set(r.dropped):
                raise secagg.SecAggError("reveal only the survivors' self-mask shares and the dropped' mask-key "
                                         "shares you hold")
            r.reveals[cid] = message
        r.count(f"{stage}_received", size)

    # --- the stages, from the round loop --------------------------------------------------------------------

    def open(self, run_id: str, round_no: int, weights: dict[str, int], cfg: Any, started: float) -> SecureRound:
        """Take keys for a secure round of the asked clients (`weights`: their n_u), before they are asked."""
        r = SecureRound(run_id, round_no, sorted(weights), dict(weights), cfg.secagg_clip, cfg.secagg_threshold,
                        cfg.secagg_neighbours, started, cfg.round_timeout)
        with self._cond:
            self._round = r
        return r

    def setup(self, r: SecureRound, stop: threading.Event,
              admit: Callable[[dict[str, int]], None] = lambda weights: None) -> SecureRound:
        """Stages 1 and 2: keys, then shares; returns the round with its secure set u2, or raises Abandoned.
        admit(u2's weights) is called once u2 is known, before anyone gets the shares it needs to send input."""
        run_id, round_no, started = r.run_id, r.round, r.started
        t = time.monotonic()
        self._wait(lambda: len(r.keys) == len(r.selected), started + 0.1 * r.timeout, stop)
        with self._cond:
            r.stage = "shares"
            u1 = sorted(r.keys)
            k = r.k or secagg.auto_neighbours(len(u1))
            r.graph = secagg.neighbours(u1, k, f"{run_id}/{round_no}") if len(u1) > 1 else {}
            r.xs = {cid: i + 1 for i, cid in enumerate(u1)}
        r.stats["seconds"]["keys"] = time.monotonic() - t
        r.stats["advertised"] = len(u1)
        if len(u1) < 2:
            self._abandon(r, f"{len(u1)} of {len(r.selected)} asked clients sent keys; a secure round needs 2")
        t = time.monotonic()
        total = sum(r.weights[c] for c in u1)
        for cid in u1:
            self._send(r, cid, "roster", {
                "threshold": r.threshold(cid), "weight": r.weights[cid], "total_weight": total, "clients": len(u1),
                "clip": r.clip, "x": {c: r.xs[c] for c in r.graph[cid] + [cid]},
                "neighbours": [{**{k_: r.keys[c][k_] for k_ in ("client_id", "mask_key", "share_key", "commitment",
                                                                "signature")},
                                "public_key": self.public_key_of(c) or ""} for c in r.graph[cid]]})
        self._wait(lambda: len(r.shares) == len(u1), started + 0.2 * r.timeout, stop)
        with self._cond:
            r.stage, r.u2 = "inputs", sorted(r.shares)
        u2 = set(r.u2)
        if len(u2) < 2:
            self._abandon(r, f"{len(u2)} of {len(u1)} clients shared their keys; a secure round needs 2")
        for owner in r.u2:
            if sum(1 for v in r.graph[owner] if v in u2) + 1 < r.threshold(owner):
                self._abandon(r, f"{owner} shared keys with fewer neighbours than its threshold "
                                 f"{r.threshold(owner)}")
        admit({cid: r.weights[cid] for cid in r.u2})
        for cid in r.u2:
            self._send(r, cid, "shares", {"shares": {u: r.shares[u][cid] for u in r.graph[cid] if u in u2}})
        r.stats["seconds"]["shares"] = time.monotonic() - t
        r.stats["shared"] = len(r.u2)
        r.stats["inputs_started"] = time.monotonic()
        return r

    def unmask(self, r: SecureRound, ring: RingSum, stop: threading.Event) -> tuple[dict[str, np.ndarray], float]:
        """Stage 4: reveal, reconstruct, unmask; (the survivors' example-weighted mean delta, their total examples),
        or Abandoned with the reason."""
        r.stats["seconds"]["inputs"] = time.monotonic() - r.stats.pop("inputs_started")
        t = time.monotonic()
        with self._cond:
            r.stage, r.survivors = "reveal", sorted(ring.weights)
            r.dropped = sorted(set(r.u2) - set(r.survivors))
        r.stats["survivors"], r.stats["dropped"] = len(r.survivors), r.dropped
        if not r.survivors:
            self._abandon(r, "no client sent its masked input")
        alive = set(r.survivors)
        for owner in r.u2:  # whose secrets too few survivors hold: abandon now rather than wait for reveals
            holding = len(alive & (set(r.graph[owner]) | {owner}))  # (shared.secagg.survives, reason included)
            if holding < r.threshold(owner):
                self._abandon(r, f"{len(r.dropped)} of {len(r.u2)} clients dropped after sharing keys; only "
                                 f"{holding} of {owner}'s neighbourhood survived, {r.threshold(owner)} are needed")
        for cid in r.survivors:
            self._send(r, cid, "reveal", {"survivors": r.survivors, "dropped": r.dropped})
        self._wait(lambda: len(r.reveals) == len(r.survivors), time.monotonic() + 0.1 * r.timeout, stop)
        with self._cond:
            r.stage = "unmasking"
        r.stats["seconds"]["reveal"] = time.monotonic() - t
        r.stats["revealed"] = len(r.reveals)
        cpu, t = time.thread_time(), time.monotonic()
        try:
            total = r.sum = self._remove_masks(r, ring)
        except secagg.SecAggError as exc:
            self._abandon(r, str(exc))
        r.stats["seconds"]["unmask"] = time.monotonic() - t
        r.stats["unmask_cpu_seconds"] = time.thread_time() - cpu
        secagg.audit(f"{r.run_id}-{r.round}.sum", lambda: secagg.flatten(total, {n: (total[n].shape, "<u4")
                                                                                  for n in sorted(total)}))
        r.stats["recovered"] = len(r.dropped)
        survivors_weight = sum(r.weights[c] for c in r.survivors)
        share = survivors_weight / sum(r.weights[c] for c in r.graph)
        with self._cond:
            self._round = None
        return secagg.dequantise(total, secagg.ring_scale(r.clip, len(r.graph)), share), float(survivors_weight)

    def _remove_masks(self, r: SecureRound, ring: RingSum) -> dict[str, np.ndarray]:
        names = sorted(ring.sum)
        spec = {n: (ring.sum[n].shape, "<u4") for n in names}
        total = secagg.flatten(ring.sum, spec)
        d = total.size
        for owner in r.survivors:  # their self-masks
            seed = self._reconstruct(r, owner, "self_mask")
            if secagg.commitment(seed) != r.keys[owner]["commitment"]:
                raise secagg.SecAggError(f"the self-mask seed rebuilt for {owner} does not match its signed "
                                         "commitment (a revealed share is wrong)")
            secagg.add_mask(total, secagg.prg(seed, d), -1)
        survivors = set(r.survivors)
        for owner in r.dropped:  # the pairwise masks their surviving neighbours added
            mask_key = self._reconstruct(r, owner, "mask_key_shares")
            if secagg.public_of(mask_key).hex() != r.keys[owner]["mask_key"]:
                raise secagg.SecAggError(f"the mask key rebuilt for {owner} does not match its signed public key")
            for v in r.graph[owner]:
                if v in survivors:
                    seed = secagg.agree(mask_key, bytes.fromhex(r.keys[v]["mask_key"]), "mask", r.context)
                    secagg.add_mask(total, secagg.prg(seed, d), -secagg.pair_sign(v, owner))
        return secagg.split_flat(total, spec)

    def _reconstruct(self, r: SecureRound, owner: str, kind: str) -> bytes:
        shares = {r.xs[v]: int(msg[kind][owner], 16) for v, msg in r.reveals.items() if owner in msg[kind]}
        needed = r.threshold(owner)
        if len(shares) < needed:
            raise secagg.SecAggError(f"{len(shares)} shares of {owner}'s {kind.replace('_shares', '')} were "
                                     f"revealed, {needed} are needed (too many clients left)")
        return secagg.combine(shares, needed)

    def _send(self, r: SecureRound, cid: str, stage: str, data: dict[str, Any]) -> None:
        payload = {"stage": stage, "run_id": r.run_id, "round": r.round, **data}
        if self.send(cid, payload):
            r.count(f"{stage}_sent", len(json.dumps(payload)))  # as Socket.IO sends it

    def _wait(self, done: Callable[[], bool], deadline: float, stop: threading.Event) -> None:
        with self._cond:
            while not done() and not stop.is_set() and time.monotonic() < deadline:
                self._cond.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))

    def _abandon(self, r: SecureRound, why: str) -> None:
        with self._cond:
            if self._round is r:
                self._round = None
        self.abandoned += 1
        raise Abandoned(f"secure aggregation abandoned the round: {why}")

    def close(self) -> None:
        """The round ended some other way (stopped, too few inputs): forget it."""
        with self._cond:
            self._round = None

    def view(self) -> dict[str, Any] | None:
        r = self._round
        return None if r is None else {"stage": r.stage, "advertised": len(r.keys), "shared": len(r.u2),
                                       "survivors": len(r.survivors)}



def secure_row(r: SecureRound) -> dict[str, Any]:
    """A secure round's telemetry for its row: clients at each stage, dropouts recovered, each stage's seconds,
    the key and share bytes (per stage, summed over clients; inputs are counted as any update's), the server's
    CPU seconds to unmask."""
    return {"neighbours": max((len(v) for v in r.graph.values()), default=0),
            "threshold": max((r.threshold(c) for c in r.graph), default=0),
            **{k: r.stats.get(k) for k in ("advertised", "shared", "survivors", "revealed", "recovered", "dropped",
                                           "unmask_cpu_seconds")},
            "seconds": {k: round(v, 4) for k, v in r.stats["seconds"].items()}, "bytes": dict(r.stats["bytes"])}
