"""Secure aggregation's two sides in one process: the server's SecureAggregation (app/secagg.py) and n
SecureSession clients (client/secagg.py), with messages passed by hand instead of Socket.IO. tests/test_secagg.py
and bench/secagg.py use it to check the protocol's arithmetic (bit for bit) and to time the server's unmasking
without processes; tests/test_secagg_integration.py runs it for real.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from app.secagg import Abandoned, SecureAggregation, SecureRound
from client.secagg import SecureSession
from shared import crypto, jsonio
from shared.accumulator import RingSum

_KEYS: list[Any] = []  # RSA keys are slow to make: one set for every simulation in a process


def rsa_keys(n: int) -> list[Any]:
    while len(_KEYS) < n:
        _KEYS.append(crypto.generate_key())
    return _KEYS[:n]


@dataclass
class Outcome:
    round: SecureRound | None
    plain_sum: np.ndarray            # the survivors' quantised inputs summed mod 2^32: what the server must get
    unmasked: np.ndarray | None      # what it got (flat), or None if abandoned
    mean: dict[str, np.ndarray] | None
    abandoned: str = ""
    masked: dict[str, np.ndarray] = field(default_factory=dict)   # client -> the masked input the server held
    inputs: dict[str, np.ndarray] = field(default_factory=dict)   # client -> its plaintext input
    client_seconds: float = 0.0      # one client's masking (quantise, masks), the slowest
    unmask_cpu_seconds: float = 0.0


def simulate(deltas: dict[str, dict[str, np.ndarray]], weights: dict[str, int], drop_after_shares: set[str] = set(),
             drop_before_keys: set[str] = set(), clip: float = 1.0, threshold: float = 0.5, neighbours: int = 0,
             seed: int = 0, round_timeout: float = 60.0) -> Outcome:
    """One secure round over `deltas` (client -> its update): some clients never send keys, some vanish after
    sharing them (before their input). The server's sum is checked by the caller."""
    clients = sorted(deltas)
    keys = dict(zip(clients, rsa_keys(len(clients))))
    pems = {cid: crypto.public_pem(k) for cid, k in keys.items()}
    inbox: dict[str, dict[str, Any]] = {cid: {} for cid in clients}
    lock = threading.Condition()

    def send(cid: str, data: dict[str, Any]) -> bool:
        with lock:
            inbox[cid][data["stage"]] = data
            lock.notify_all()
        return True

    def wait(cid: str, stage: str, unless: threading.Thread | None = None) -> dict[str, Any] | None:
        with lock:
            assert lock.wait_for(lambda: stage in inbox[cid] or (unless and not unless.is_alive()), timeout=30), \
                f"{cid} got no {stage}"
            return inbox[cid].pop(stage, None)

    server = SecureAggregation(pems.get, send)
    cfg = SimpleNamespace(secagg_clip=clip, secagg_threshold=threshold, secagg_neighbours=neighbours,
                          round_timeout=round_timeout)
    stop, result = threading.Event(), {}

    def background(fn: Any, *args: Any) -> threading.Thread:
        def run() -> None:
            try:
                result[fn.__name__] = fn(*args)
            except Abandoned as exc:
                result["abandoned"] = str(exc)
            with lock:
                lock.notify_all()
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def deliver(cid: str, message: dict[str, Any]) -> None:
        reply = server.receive(cid, message, len(jsonio.dumps(message)))
        assert reply["accepted"], reply

    setup = background(server.setup, server.open("run", 1, weights, cfg, time.monotonic()), stop)
    sessions = {cid: SecureSession(keys[cid], cid, "run", 1) for cid in clients if cid not in drop_before_keys}
    for cid, s in sessions.items():
        deliver(cid, s.keys_message())
    for cid, s in sessions.items():
        deliver(cid, s.on_roster(wait(cid, "roster")))
    setup.join()
    if "abandoned" in result:
        return Outcome(None, np.zeros(0, np.uint32), None, None, result["abandoned"])
    r: SecureRound = result["setup"]
    for cid in r.u2:
        sessions[cid].on_shares(wait(cid, "shares"))
    ring, rng = RingSum(), np.random.default_rng(seed)
    plain, outcome = None, Outcome(r, np.zeros(0, np.uint32), None, None)
    for cid in r.u2:
        if cid in drop_after_shares:
            continue
        started = time.perf_counter()
        flat, _ = sessions[cid].quantised(deltas[cid], rng)
        masked = sessions[cid].mask(flat)
        outcome.client_seconds = max(outcome.client_seconds, time.perf_counter() - started)
        outcome.inputs[cid], outcome.masked[cid] = flat, masked
        plain = flat.copy() if plain is None else plain + flat
        ring.add({"flat": masked}, weights[cid], cid)
    outcome.plain_sum = plain if plain is not None else np.zeros(0, np.uint32)
    unmask = background(server.unmask, r, ring, stop)
    for cid in sorted(ring.weights):
        asked = wait(cid, "reveal", unless=unmask)
        if asked is not None:
            deliver(cid, sessions[cid].on_reveal(asked))
    unmask.join()
    if "abandoned" in result:
        outcome.abandoned = result["abandoned"]
        return outcome
    outcome.mean = result["unmask"][0]
    outcome.unmasked = r.sum["flat"]
    outcome.unmask_cpu_seconds = r.stats["unmask_cpu_seconds"]
    return outcome
