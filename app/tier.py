"""The edge tier: several server processes share one run's clients (README "Edges"; issue 20).

    clients ── nginx, sticky by X-Meshfed-Client ──► edges (--role edge) ── partial sums ──► the leader

An edge (app/edge.py) holds its clients' websockets, serves them the model (fetched once a version from the
leader), verifies their updates and keeps the open round's running weighted sum, as the leader's own collection
does (app/collection.py). When the leader closes a round, every edge hands its sum over through Redis, and the
leader adds it to the round's accumulator like one more update, weighted by the examples behind it: "an edge's
partial sum is just another add()". The round's control (train, cancel, new_model) reaches each client through
Flask-SocketIO's Redis message queue, as the dashboards' events do. Sessions stay the leader's: an edge admits a
registration (its challenge, its signature) and asks the leader to pin the key and record the session
(POST /api/edge/connect), so selection, the client table and "one live session per client id" live in one place.

What Redis carries, under `meshfed:tier:` (the message queue's server; whoever can write to it controls the
federation, as with the message queue itself):

    channel meshfed:tier         round, close (leader to edges); arrived, refused (edges to the leader)
    round                        the open round, for an edge that starts (or restarts) while it is open
    edges, edge:<id>             the edges, and each one's heartbeat (EDGE_TTL s): a missing one is a dead edge
    delivered:<run>:<round>:<c>  SET NX: one update per client and round, whichever edge it reaches
    partial:<run>:<round>:<e>    an edge's sum (safetensors) and its arrivals (JSON), with handoff:<run>:<round>

<round> is the round's number and its opening (`3.9f1c...`): a round that failed is played again under the same
number, and its second opening must neither be taken for the first at the edges nor refuse as replays the
updates of clients that delivered in the first (measured: every update of a replayed round was refused).

A killed edge loses the updates it held for the open round, nothing else: the leader stops waiting for them
once its heartbeat lapses, combines the other edges' sums, and its clients reconnect through nginx to another.

Only rules that stream shard (FedAvg, FedProx, FedOpt: a running weighted mean). Rules that need every update
(Krum, median, trimmed mean, Bulyan, plug-ins registered without streams=True), secure aggregation and
client-level DP run on one process: in their rounds the leader asks only the clients connected to itself, and
edges refuse updates with reason `not_sharded`.
"""
from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import redis

from app.verify import OpenRound
from shared import jsonio
from shared.errors import UpdateRefused
from shared.protocol import decode_weights, encode_weights

log = logging.getLogger("meshfed.tier")

PREFIX = "meshfed:tier:"
CHANNEL = "meshfed:tier"
EDGE_TTL = 15.0        # seconds an edge's heartbeat lives; it renews it every second. An edge busy with a round can
                       # miss its beat for seconds (3 s lost two live edges of 1,333 clients each: their clients,
                       # still connected, were forgotten); 15 s as the leader lock's TTL
HANDOFF_SECONDS = 30.0  # how long the leader waits for a live edge's partial sum once a round closes
KEEP_SECONDS = 600     # partial sums and delivery marks expire after this


def round_message(r: OpenRound, shardable: bool, opening: str = "") -> dict[str, Any]:
    """The open round as the edges need it (JSON); `opening` tells this opening of its number from another."""
    return {"type": "round", "run_id": r.run_id, "round": r.round, "opening": opening,
            "model_version": r.model_version,
            "selected": sorted(r.selected), "spec": {k: [list(shape), dtype] for k, (shape, dtype) in r.spec.items()},
            "max_bytes": r.max_bytes, "compression": r.compression, "topk_ratio": r.topk_ratio,
            "shardable": shardable}


def open_round(message: dict[str, Any]) -> OpenRound:
    return OpenRound(message["run_id"], int(message["round"]), int(message["model_version"]),
                     frozenset(message["selected"]),
                     {k: (tuple(shape), dtype) for k, (shape, dtype) in message["spec"].items()},
                     int(message["max_bytes"]), message["compression"], float(message["topk_ratio"]))


def delivered_key(run_id: str, round_no: int, client_id: str, opening: str = "") -> str:
    return f"{PREFIX}delivered:{run_id}:{round_no}.{opening}:{client_id}"


REDIS_CONNECTIONS = 512  # a server process's connections to the tier's Redis for its requests; more callers wait


def connect_redis(url: str, connections: int = REDIS_CONNECTIONS) -> redis.Redis:
    """A client of the tier's Redis that waits (up to 30 s) for a free connection rather than failing: redis-py's
    default pool fails past 100 connections in use ("Too many connections"). Measured at 4,000 clients: thousands
    of greenlets on a gevent edge, or hundreds of threads at the leader, ask at once; on a busy edge a connection
    is held until its greenlet's turn comes again. The heartbeat, the channel and the handoffs use a pool of their
    own (connections=8), so requests waiting for Redis never hold up the heartbeat."""
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=connections, timeout=30,
                                                 socket_timeout=10, health_check_interval=30)
    return redis.Redis(connection_pool=pool)


def claim(r: redis.Redis, header: Any, opening: str = "") -> None:
    """Mark header's client as having delivered its round (this opening of it); UpdateRefused('replay') if it
    already had."""
    try:
        fresh = r.set(delivered_key(header.run_id, header.round, header.client_id, opening), 1, nx=True,
                      ex=KEEP_SECONDS)
    except redis.RedisError as exc:  # not the sender's fault: it may send again
        raise UpdateRefused("queue_unreachable", f"the tier's Redis did not answer ({type(exc).__name__}); "
                                                 "send it again") from None
    if not fresh:
        raise UpdateRefused("replay", f"{header.client_id!r} already delivered round {header.round}")


@dataclass
class Partial:
    """What one edge collected in a round: the weighted mean of its updates and their total weight (None, 0 if
    it had none), and each update's Arrival fields (app/collection.py)."""

    edge: str
    mean: dict[str, np.ndarray] | None
    total: float
    arrivals: list[dict[str, Any]]


def hand_off(r: redis.Redis, edge: str, run_id: str, round_no: int, opening: str, result: list[tuple[dict, float]],
             arrivals: list[dict[str, Any]]) -> None:
    """An edge's side of a closed round: its sum and arrivals under partial:..., then its id on handoff:..."""
    key = f"{PREFIX}partial:{run_id}:{round_no}.{opening}:{edge}"
    pipe = r.pipeline()
    if result:
        (mean, total), = result
        pipe.set(key, encode_weights(mean), ex=KEEP_SECONDS)
    else:
        total = 0.0
    pipe.set(key + ":arrivals", jsonio.dumps({"total": total, "arrivals": arrivals}), ex=KEEP_SECONDS)
    pipe.rpush(f"{PREFIX}handoff:{run_id}:{round_no}.{opening}", edge)
    pipe.expire(f"{PREFIX}handoff:{run_id}:{round_no}.{opening}", KEEP_SECONDS)
    pipe.execute()


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


class LeaderTier:
    """The leader's side: announces rounds, hears arrivals and refusals, notices dead edges, gathers partial sums.

    on_arrived(run_id, round, client_id), on_refused(message) and on_edge_lost(edge) are called from its threads.
    """

    def __init__(self, url: str, on_arrived: Callable[[str, int, str], None],
                 on_refused: Callable[[dict[str, Any]], None], on_edge_lost: Callable[[str], None]):
        self.redis = connect_redis(url)  # for requests: alive, claim
        self.control = connect_redis(url, connections=8)  # rounds, heartbeats, the channel: never behind those
        self.on_arrived, self.on_refused, self.on_edge_lost = on_arrived, on_refused, on_edge_lost
        self._known: set[str] = set()  # the edges seen alive (and not yet seen dead)
        self.opening = ""  # the open round's opening (announce)
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._listen, name="tier-listen", daemon=True).start()
        threading.Thread(target=self._watch, name="tier-watch", daemon=True).start()

    def edges(self) -> set[str]:
        """The edges whose heartbeat is alive."""
        members = sorted(m.decode() for m in self.control.smembers(PREFIX + "edges"))
        if not members:
            return set()
        alive = self.control.pipeline()
        for edge in members:
            alive.exists(f"{PREFIX}edge:{edge}")
        return {edge for edge, up in zip(members, alive.execute()) if up}

    def alive(self, edge: str) -> bool:
        try:
            return bool(self.redis.exists(f"{PREFIX}edge:{edge}"))
        except redis.RedisError:
            return True  # not known to be dead: keep its session

    def claim(self, header: Any) -> None:
        """Refuse ('replay') an update whose client already delivered this round at any edge (or the leader)."""
        claim(self.redis, header, self.opening)

    def announce(self, r: OpenRound, shardable: bool) -> None:
        """Tell the edges a round is open (and keep it for edges that start later)."""
        self.opening = secrets.token_hex(8)  # this opening of round r.round (a failed round opens again)
        message = jsonio.dumps(round_message(r, shardable, self.opening))
        pipe = self.control.pipeline()
        pipe.set(PREFIX + "round", message)
        pipe.publish(CHANNEL, message)
        pipe.execute()

    def gather(self, r: OpenRound, timeout: float = HANDOFF_SECONDS) -> list[Partial]:
        """Close `r` at the edges and collect the partial sum of every edge alive at its close (one that dies
        before handing its sum over is not waited for)."""
        closed = jsonio.dumps({"type": "close", "run_id": r.run_id, "round": r.round, "opening": self.opening})
        pipe = self.control.pipeline()
        pipe.set(PREFIX + "round", closed)
        pipe.publish(CHANNEL, closed)
        pipe.execute()
        expected, got = self.edges(), {}
        with self._lock:
            dead = self._known - expected
            self._known |= expected  # seen alive: forgotten (its sessions ended) if it dies before handing over
        for edge in sorted(dead):  # the next round must not select a dead edge's clients
            self._forget(edge)
        handoff, deadline = f"{PREFIX}handoff:{r.run_id}:{r.round}.{self.opening}", time.monotonic() + timeout
        while expected - got.keys() and time.monotonic() < deadline:
            item = self.control.blpop([handoff], timeout=1)
            if item is None:
                live = self.edges()
                for edge in sorted(expected - live - got.keys()):
                    self._forget(edge)  # before the next round selects its clients
                expected &= live | got.keys()
                continue
            edge = item[1].decode()
            if edge in got:  # handed over once already
                continue
            try:
                got[edge] = self._partial(r, edge)
            except Exception:  # a partial that does not decode loses that edge's updates, not the round
                log.exception("edge %s handed over round %d's partial sum in a form that does not decode", edge,
                              r.round)
        if expected - got.keys():
            log.warning("round %d: no partial sum from edge(s) %s; their updates are lost", r.round,
                        ", ".join(sorted(expected - got.keys())))
        return [got[e] for e in sorted(got)]

    def _partial(self, r: OpenRound, edge: str) -> Partial:
        key = f"{PREFIX}partial:{r.run_id}:{r.round}.{self.opening}:{edge}"
        pipe = self.control.pipeline()
        pipe.get(key)
        pipe.get(key + ":arrivals")
        data, meta = pipe.execute()
        meta = jsonio.loads(meta or b"{}", max_bytes=64 << 20)
        mean = decode_weights(data, max_bytes=r.max_bytes * 4) if data else None
        if mean is not None and {k: (tuple(v.shape), v.dtype.str) for k, v in mean.items()} != r.spec:
            raise ValueError(f"edge {edge}'s sum does not have the model's arrays")
        return Partial(edge, mean, float(meta.get("total", 0.0)), list(meta.get("arrivals", [])))

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                pubsub = self.control.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                for item in pubsub.listen():
                    message = jsonio.loads(item["data"], max_bytes=1 << 20)
                    if message.get("type") == "arrived":
                        self.on_arrived(message["run_id"], int(message["round"]), message["client_id"])
                    elif message.get("type") == "refused":
                        self.on_refused(message)
            except Exception:  # Redis restarted, or a message we cannot read: listen again
                log.exception("the tier's channel failed; listening again in 1 s")
                time.sleep(1.0)

    def _watch(self) -> None:
        """Every second: an edge whose heartbeat lapsed is dead; its sessions end (its clients reconnect)."""
        while not self._stop.wait(1.0):
            try:
                live = self.edges()
            except redis.RedisError as exc:
                log.warning("cannot read the edges' heartbeats: %s", exc)
                continue
            with self._lock:
                dead = self._known - live
            for edge in sorted(dead):
                self._forget(edge)
            with self._lock:
                for edge in sorted(live - self._known):
                    log.info("edge %s joined", edge)
                self._known |= live

    def _forget(self, edge: str) -> None:
        """A dead edge (its heartbeat lapsed): its sessions end, once, whether the watch or a round's close saw it."""
        with self._lock:
            if edge not in self._known:
                return
            self._known.discard(edge)
        log.warning("edge %s stopped (no heartbeat for %.0f s): its sessions end", edge, EDGE_TTL)
        self.control.srem(PREFIX + "edges", edge)
        self.on_edge_lost(edge)
