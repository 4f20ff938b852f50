"""An edge server (--role edge): holds some of the clients, verifies and pre-aggregates their updates.

app/tier.py has the picture and what travels through Redis. Here, what an edge does for its clients:

- /fl: a client's registration is admitted here (this edge's challenge, the signature over it), then the leader
  pins the key and records the session (POST /api/edge/connect), or refuses it, e.g. already_connected. Status
  reports and disconnects are forwarded the same way. Secure-aggregation messages are refused: it does not shard.
- GET /api/challenge: this edge's challenges (nginx keeps a client on one edge: sticky by X-Meshfed-Client).
- GET /api/model/<v> (and its coded steps): fetched from the leader once a version, then served from memory.
- POST /api/update: the checks the leader makes (signature against the pinned key, fetched from the leader once;
  the open round, its asked clients, one update a client and round across the tier; arrays, finiteness), then
  the update goes into this edge's running sum of the round, and the leader hears it arrived.
- Any other /api/ request is passed on to the leader as it came (without this edge's credentials).
"""
from __future__ import annotations

import atexit
import hashlib
import hmac
import logging
import socket
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import redis
import requests
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from flask_socketio import ConnectionRefusedError, Namespace, SocketIO
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from requests.adapters import HTTPAdapter

from app.api import REFUSAL_STATUS, VERSION, error, read_signed_body
from app.collection import Collection, arrival_json
from app.config import ServerConfig
from app.enrollment import CHALLENGE_SECONDS, Enrollment
from app.fl import socket_open, sweep_closed
from app.ops import Traffic, make_registry, rate_limit_metrics
from app.ops import bp as ops_bp
from app.ratelimit import RateLimited, RateLimits
from app.registry import IDLE, Registry, Session
from app.tier import CHANNEL, EDGE_TTL, PREFIX, claim, connect_redis, hand_off, open_round
from app.verify import Verified, check_signature
from shared import jsonio
from shared.accumulator import WeightedSum
from shared.errors import RegistrationRefused, UpdateRefused
from shared.protocol import EV_WELCOME, MAX_EXAMPLES, NAMESPACE, UpdateHeader, unpack_update

log = logging.getLogger("meshfed.edge")


def tier_secret(admin_token: str) -> bytes:
    """The edges' shared challenge secret, derived from the admin token they all hold (clients do not)."""
    return hmac.new(admin_token.encode(), b"meshfed-tier-challenge", hashlib.sha256).digest()
UNKNOWN_SECONDS = 10.0  # how long an id the leader has no key for is not asked about again
CACHED_MODELS = 6  # model versions (and coded steps) kept in memory
PASSED_ON = ("Content-Type", "X-Model-Version", "X-Model-SHA256", "X-Delta-From", "Content-Disposition",
             "Retry-After")


# Updates an edge reads, checks and adds at once. The others wait for a turn with their bodies unread (nginx
# waits for them: proxy_send_timeout), so that memory does not grow with the queue: read first, 3,333 clients'
# updates took 3.6 GB an edge and the machine's memory ran out. Too few at once starves the edge instead: on
# gevent a body's read yields at each chunk, and with 4 at a time an edge took 35 updates in minutes
# (bench/RESULTS.md "Edges"). 64 bodies are about 50 MB.
UPDATES_AT_ONCE = 64
LEADER_CONNECTIONS = 256  # an edge's connections to its leader, for its own calls and again for passed-on requests


class Leader:
    """The leader's REST API as an edge calls it: its own calls carry the admin token; requests passed on for a
    client (pass_on) carry only what the client sent."""

    def __init__(self, url: str, admin_token: str):
        self.url = url.rstrip("/")
        self.http, self.plain = requests.Session(), requests.Session()
        # One connection per concurrent request, kept alive, at most LEADER_CONNECTIONS: past that a request waits
        # for one (a gevent edge has thousands of greenlets; unbounded, each would open and drop its own).
        for session in (self.http, self.plain):
            for scheme in ("http://", "https://"):
                session.mount(scheme, HTTPAdapter(pool_connections=4, pool_maxsize=LEADER_CONNECTIONS,
                                                  pool_block=True))
        self.http.headers["Authorization"] = f"Bearer {admin_token}"

    def post(self, path: str, body: dict[str, Any]) -> requests.Response:
        return self.http.post(self.url + path, json=body, timeout=30)

    def get(self, path: str) -> requests.Response:
        return self.http.get(self.url + path, timeout=60)

    def alive(self) -> bool:
        try:
            return self.plain.get(self.url + "/healthz", timeout=2).ok
        except requests.RequestException:
            return False


class Models:
    """Model downloads fetched from the leader once a version (and once a coded step), then served from memory;
    concurrent requests for one version wait for a single fetch."""

    def __init__(self, leader: Leader):
        self.leader = leader
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, tuple[int, bytes, dict[str, str]]] = OrderedDict()
        self._fetching: dict[str, threading.Lock] = {}

    def get(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        """(status, body, headers) of the leader's answer to GET `path`; answers for numbered versions are kept."""
        if "latest" in path:  # changes with every round
            return self._fetch(path)
        with self._lock:
            fetching = self._fetching.setdefault(path, threading.Lock())
        with fetching:
            with self._lock:
                if path in self._kept:
                    self._kept.move_to_end(path)
                    return self._kept[path]
            answer = self._fetch(path)
            with self._lock:
                self._fetching.pop(path, None)
                if answer[0] == 200:
                    self._kept[path] = answer
                    while len(self._kept) > CACHED_MODELS:
                        self._kept.popitem(last=False)
            return answer

    def _fetch(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        r = self.leader.plain.get(self.leader.url + path, timeout=60)
        return r.status_code, r.content, {k: r.headers[k] for k in PASSED_ON if k in r.headers}


class Bus:
    """This edge on the tier's Redis: its heartbeat, the leader's round and close messages (each round opened
    and closed in this edge's collection, its partial sum handed over at close), arrivals and refusals out."""

    def __init__(self, url: str, edge_id: str, collection: Collection):
        self.redis = connect_redis(url)  # for requests: claims, challenges, arrivals and refusals
        self.control = connect_redis(url, connections=8)  # heartbeat, channel, handoffs: never behind those
        self.edge_id, self.collection = edge_id, collection
        self.current: tuple[str, int, str] | None = None  # the (run, round, opening) open here
        self.closed: tuple[str, int, str] | None = None   # the last one closed (and handed over) here
        self.shardable = True
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beaten = False  # a first beat has been made
        self.on_forgotten: Any = None  # called when a beat finds the leader had given this edge up

    def start(self) -> None:
        self._beat()
        threading.Thread(target=self._heartbeat, name="edge-heartbeat", daemon=True).start()
        threading.Thread(target=self._listen, name="edge-listen", daemon=True).start()
        atexit.register(self.leave)

    def leave(self) -> None:
        """A clean exit: the leader ends this edge's sessions now, not after its heartbeat lapses."""
        self._stop.set()
        try:
            self.control.delete(f"{PREFIX}edge:{self.edge_id}")
        except redis.RedisError:
            pass

    def _beat(self) -> None:
        pipe = self.control.pipeline()
        pipe.set(f"{PREFIX}edge:{self.edge_id}", int(time.time()), ex=int(EDGE_TTL))
        pipe.sadd(PREFIX + "edges", self.edge_id)
        _, added = pipe.execute()
        if added and self._beaten and self.on_forgotten is not None:
            # the leader took this edge for dead (it missed its beat) and ended its sessions: its clients must
            # register again, or they would stay connected here and never be asked
            log.warning("the leader had given this edge up; its clients reconnect")
            self.on_forgotten()
        self._beaten = True

    def _heartbeat(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self._beat()
            except redis.RedisError as exc:
                log.warning("cannot renew this edge's heartbeat: %s", exc)

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                pubsub = self.control.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                self.sync()  # what was said before we listened
                for item in pubsub.listen():
                    message = jsonio.loads(item["data"], max_bytes=16 << 20)
                    if message.get("type") in ("round", "close"):
                        self.apply(message)
            except Exception:
                log.exception("the tier's channel failed; listening again in 1 s")
                time.sleep(1.0)

    def sync(self) -> None:
        """Catch up with the leader's last round message (at start, and when an update is for a newer round)."""
        raw = self.control.get(PREFIX + "round")
        if raw:
            self.apply(jsonio.loads(raw, max_bytes=16 << 20))

    def apply(self, message: dict[str, Any]) -> None:
        key = (message["run_id"], int(message["round"]), str(message.get("opening", "")))
        with self._lock:
            if message["type"] == "round" and key not in (self.current, self.closed):
                if self.current is not None:  # its close never reached us: hand it over now
                    self._close(*self.current)
                self.collection.open(open_round(message), WeightedSum(), {})
                self.current, self.shardable = key, bool(message.get("shardable"))
            elif message["type"] == "close" and key != self.closed:
                if key == self.current:
                    self._close(*key)
                elif self.current is None:  # not open here (this edge started after): nothing of it is lost
                    hand_off(self.control, self.edge_id, *key, [], [])
                    self.closed = key

    def _close(self, run_id: str, round_no: int, opening: str) -> None:
        arrivals, accumulator, _ = self.collection.close(0)
        self.current, self.closed = None, (run_id, round_no, opening)
        hand_off(self.control, self.edge_id, run_id, round_no, opening,
                 accumulator.result() if accumulator else [], [arrival_json(a) for a in arrivals])
        log.info("round %d closed: %d updates handed to the leader", round_no, len(arrivals))

    def claim(self, header: UpdateHeader) -> None:
        current = self.current  # the collection checked the header's round against it
        claim(self.redis, header, current[2] if current else "")

    def redeem(self, challenge: str, ttl: float) -> bool:
        """True the first time `challenge` is redeemed anywhere in the tier."""
        return bool(self.redis.set(f"{PREFIX}challenge:{challenge}", 1, nx=True, ex=max(1, int(ttl))))

    def publish(self, message: dict[str, Any]) -> None:
        try:
            self.redis.publish(CHANNEL, jsonio.dumps(message))
        except redis.RedisError as exc:
            log.warning("cannot tell the leader (%s): %s", message.get("type"), exc)


@dataclass
class Edge:
    """What an edge process holds; reachable as app.extensions['meshfed']."""

    config: ServerConfig
    edge_id: str
    socketio: SocketIO
    leader: Leader
    bus: Bus
    collection: Collection
    enrollment: Enrollment
    limits: RateLimits
    registry: Registry = field(default_factory=Registry)  # this edge's sessions (the leader has them all)
    keys: dict[str, tuple[str, int]] = field(default_factory=dict)  # client -> (pinned key, examples registered)
    unknown: dict[str, float] = field(default_factory=dict)  # ids the leader has no key for -> when it said so
    outcomes: Counter = field(default_factory=Counter)  # updates: accepted, or the reason they were refused
    traffic: Traffic = field(default_factory=Traffic)
    metrics_registry: Any = None
    models: Models | None = None
    unsent: dict[str, str] = field(default_factory=dict)  # sid -> client id of disconnects the leader has not heard
    working: Any = field(default_factory=lambda: threading.BoundedSemaphore(UPDATES_AT_ONCE))  # updates in hand

    def readiness(self) -> dict[str, bool]:
        try:
            queue = bool(self.bus.redis.ping())
        except redis.RedisError:
            queue = False
        return {"leader_reachable": self.leader.alive(), "message_queue": queue}

    def start_background(self) -> None:
        self.bus.on_forgotten = self.drop_clients
        self.bus.start()
        threading.Thread(target=self._resend_disconnects, name="edge-disconnects", daemon=True).start()
        threading.Thread(target=sweep_closed, args=(self.registry, self.socketio.server, self.tell_gone,
                                                    self.edge_id), name="edge-sweep", daemon=True).start()

    def tell_gone(self, client_id: str, sid: str) -> bool:
        """Tell the leader a client left this edge; False (kept, and sent again every 5 s) if it did not hear:
        else it would keep the session, ask the client in rounds, and wait for it each time."""
        try:
            answer = self.leader.post("/api/edge/disconnect", {"edge": self.edge_id, "client_id": client_id,
                                                                "sid": sid})
            if answer.status_code >= 500:
                raise requests.HTTPError(f"{answer.status_code}: {answer.text[:200]}")
            return True
        except requests.RequestException as exc:
            log.warning("cannot tell the leader that %s left: %s; telling it again in 5 s", client_id, exc)
            self.unsent[sid] = client_id
            return False

    def _resend_disconnects(self) -> None:
        while True:
            time.sleep(5.0)
            for sid, client_id in list(self.unsent.items()):
                if self.unsent.pop(sid, None) is not None and not self.tell_gone(client_id, sid):
                    break  # the leader is still unreachable: the rest wait for the next try

    def drop_clients(self) -> None:
        """Disconnect every client here: each reconnects (through nginx) and registers with the leader again."""
        for session in self.registry.online():
            self.socketio.server.disconnect(session.sid, namespace=NAMESPACE)

    def authenticate(self, header: UpdateHeader, payload: bytes) -> Verified:
        """The signature against the client's pinned key (asked of the leader once); UpdateRefused otherwise."""
        known, cid = self.keys.get(header.client_id), header.client_id
        if known is None and time.monotonic() - self.unknown.get(cid, -UNKNOWN_SECONDS) >= UNKNOWN_SECONDS:
            try:
                r = self.leader.get(f"/api/edge/client/{cid}")
            except requests.RequestException as exc:
                raise UpdateRefused("leader_unreachable", f"this edge cannot reach the leader "
                                                          f"({type(exc).__name__}); send it again") from None
            if r.status_code == 200:
                known = self.keys[cid] = (r.json()["public_key"], int(r.json()["num_examples"] or 0))
            elif r.status_code == 404:  # remembered a while: a flood of made-up ids does not reach the leader
                if len(self.unknown) >= 10_000:
                    self.unknown.clear()
                self.unknown[cid] = time.monotonic()
            else:
                raise UpdateRefused("leader_unreachable", f"the leader answered {r.status_code}; send it again")
        check_signature(header, payload, known[0] if known else None)
        return Verified(header, payload, known[1])

    def refuse(self, exc: UpdateRefused, header: UpdateHeader | None = None) -> Any:
        """Count and answer a refusal; the leader counts it too (against the client only if it was verified)."""
        self.outcomes[exc.reason] += 1
        self.bus.publish({"type": "refused", "verified": header is not None, "reason": exc.reason,
                          "message": str(exc), "client_id": header.client_id if header else None,
                          "address": None if header else request.remote_addr,
                          "run_id": header.run_id if header else None, "round": header.round if header else None})
        reply, status = error(REFUSAL_STATUS.get(exc.reason, 400), exc.reason, str(exc), reason=exc.reason)
        if isinstance(exc, RateLimited):
            reply.headers["Retry-After"] = str(int(exc.retry_after + 0.999))
        return reply, status


class EdgeCollector:
    def __init__(self, edge: Edge):
        self.edge = edge

    def collect(self) -> Any:
        yield GaugeMetricFamily("meshfed_clients_connected", "Clients connected on /fl to this edge",
                                value=self.edge.registry.count())
        updates = CounterMetricFamily("meshfed_edge_updates", "Updates this edge took or refused, by outcome",
                                      labels=["outcome"])
        for outcome, n in sorted(self.edge.outcomes.items()):
            updates.add_metric([outcome], n)
        yield updates
        yield from rate_limit_metrics(self.edge.limits)


def _edge() -> Edge:
    return current_app.extensions["meshfed"]


bp = Blueprint("edge", __name__)


@bp.get("/api/challenge")
def challenge() -> Any:
    edge = _edge()
    try:
        edge.limits.hit("connect-per-address", request.remote_addr)
    except RateLimited as exc:
        return edge.refuse(exc)
    return jsonify({"challenge": edge.enrollment.challenge(), "expires_in": CHALLENGE_SECONDS})


@bp.get("/api/model/<version>")
@bp.get("/api/model/<version>/delta")
def model(version: str) -> Any:
    if not VERSION.fullmatch(version):
        return error(404, "no_such_version", f"no model version {version[:20]!r}; GET /api/models lists them")
    base = request.args.get("from", "")
    path = f"/api/model/{version}" + (f"/delta?from={base}" if request.path.endswith("/delta") else "")
    if base and not VERSION.fullmatch(base):
        return error(404, "no_delta", f"no coded step from version {base[:20]!r}")
    try:
        status, body, headers = _edge().models.get(path)
    except requests.RequestException as exc:
        return error(503, "leader_unreachable", f"this edge cannot reach the leader ({type(exc).__name__}); "
                                                "try again shortly")
    if status == 200:
        _edge().traffic.add(sent=len(body), delta="/delta" in path)
    return Response(body, status=status, headers=headers)


@bp.post("/api/update")
def update() -> Any:
    """As the leader's POST /api/update, into this edge's running sum of the open round."""
    edge = _edge()
    with edge.working:  # a few at a time: the rest wait off the CPU with their bodies unread (in their sockets)
        return _take_update(edge)


def _take_update(edge: Edge) -> Any:
    try:
        header, payload = unpack_update(read_signed_body("update-per-address"))
        verified = edge.authenticate(header, payload)
    except UpdateRefused as exc:  # nobody's signature vouches for this request: the address answers for it
        return edge.refuse(exc)
    try:
        edge.limits.hit("update-per-client", header.client_id)
        if (edge.bus.current or ())[:2] != (header.run_id, header.round):
            edge.bus.sync()  # the leader's round message may still be on its way
        if not edge.bus.shardable:
            raise UpdateRefused("not_sharded", "this run's aggregation needs every update at the leader "
                                               "(robust rules, secure aggregation, client-level DP)")
        edge.collection.offer(verified, merge_stragglers=False)
    except UpdateRefused as exc:
        return edge.refuse(exc, header)
    edge.outcomes["accepted"] += 1
    edge.bus.publish({"type": "arrived", "run_id": header.run_id, "round": header.round,
                      "client_id": header.client_id})
    return jsonify({"accepted": True, "round": header.round, **({"notes": list(header.notes)} if header.notes
                                                                else {})})


@bp.route("/api/<path:rest>", methods=["GET", "POST"])
def pass_on(rest: str) -> Any:
    """Everything else a client asks (roster, offline contributions, status...) is the leader's to answer."""
    edge = _edge()
    headers = {k: v for k, v in request.headers.items() if k in ("Content-Type", "Authorization", "Accept")}
    headers["X-Forwarded-For"] = request.remote_addr or ""
    body = read_signed_body("sync-per-address") if request.method == "POST" else None
    try:
        r = edge.leader.plain.request(request.method, f"{edge.leader.url}/api/{rest}", params=request.args,
                                      data=body, headers=headers, timeout=60)
    except requests.RequestException as exc:
        return error(503, "leader_unreachable", f"this edge cannot reach the leader ({type(exc).__name__})")
    return Response(r.content, status=r.status_code, headers={k: r.headers[k] for k in PASSED_ON if k in r.headers})


class EdgeNamespace(Namespace):
    """/fl at an edge: admit here, record at the leader; status and disconnects forwarded to it."""

    def __init__(self, edge: Edge):
        super().__init__(NAMESPACE)
        self.edge = edge

    def on_connect(self, auth: Any = None) -> None:
        claimed = str(auth.get("client_id"))[:64] if isinstance(auth, dict) else "?"
        try:
            session, run_id = self._admit(auth)
        except RateLimited as exc:
            raise ConnectionRefusedError(str(exc)) from None
        except RegistrationRefused as exc:
            log.warning("refused a connection as %s from %s: %s", claimed, request.remote_addr, exc)
            raise ConnectionRefusedError(str(exc)) from None
        except requests.RequestException as exc:
            raise ConnectionRefusedError(f"leader_unreachable: this edge cannot reach the leader "
                                         f"({type(exc).__name__}); try again shortly") from None
        except Exception:
            log.exception("connection as %s from %s failed", claimed, request.remote_addr)
            raise ConnectionRefusedError("server_error: the edge could not register this client; "
                                         "see its log") from None
        self.emit(EV_WELCOME, {"client_id": session.client_id, "run_id": run_id,
                               "fingerprint": session.fingerprint}, room=request.sid)

    def _admit(self, auth: Any) -> tuple[Session, str | None]:
        edge = self.edge
        edge.limits.hit("connect-per-address", request.remote_addr)
        r, fingerprint = edge.enrollment.admit_auth(auth)
        body = {"edge": edge.edge_id, "client_id": r.client_id, "sid": request.sid, "public_key": r.public_key,
                "fingerprint": fingerprint, "num_examples": r.num_examples}
        answer = edge.leader.post("/api/edge/connect", body)
        held = answer.json().get("held_sid") if answer.status_code == 409 else None
        if isinstance(held, str) and not self._live(held):
            # the leader holds a session of this client on this edge whose socket is closed: the notice of its
            # disconnect was lost. Only this edge can tell; a live socket is never pushed aside.
            log.info("client %s: its old session %s here is closed; replacing it", r.client_id, held)
            answer = edge.leader.post("/api/edge/connect", {**body, "replace": held})
        if answer.status_code == 409:
            body = answer.json()
            raise RegistrationRefused(body.get("reason", "refused"), body.get("message", "").split(": ", 1)[-1])
        answer.raise_for_status()
        session = Session(client_id=r.client_id, sid=request.sid, fingerprint=fingerprint,
                          num_examples=r.num_examples, state=IDLE, edge=edge.edge_id)
        if (old := edge.registry.get(r.client_id)) is not None:  # its old socket here is dead: the leader said so
            edge.registry.disconnect(old.sid)
        edge.registry.connect(session)
        edge.keys[r.client_id] = (r.public_key, r.num_examples)
        edge.unknown.pop(r.client_id, None)
        log.info("client %s connected (%s)", r.client_id, fingerprint[:19])
        return session, answer.json().get("run_id")

    def _live(self, sid: str) -> bool:
        """Whether `sid` is a session of this edge whose socket is still open."""
        return self.edge.registry.client_for_sid(sid) is not None and socket_open(self.socketio.server, sid)

    def on_disconnect(self, *_: Any) -> None:
        client_id = self.edge.registry.disconnect(request.sid)
        if client_id is None:
            return
        log.info("client %s disconnected", client_id)
        self.edge.tell_gone(client_id, request.sid)

    def on_client_status(self, data: Any = None) -> None:  # EV_CLIENT_STATUS
        client_id = self.edge.registry.client_for_sid(request.sid)
        if client_id is None or not isinstance(data, dict):
            return
        examples = data.get("num_examples")
        if isinstance(examples, int) and not isinstance(examples, bool) and 0 < examples <= MAX_EXAMPLES \
                and client_id in self.edge.keys:
            self.edge.keys[client_id] = (self.edge.keys[client_id][0], examples)
        try:
            self.edge.leader.post("/api/edge/status", {"edge": self.edge.edge_id, "client_id": client_id,
                                                       "sid": request.sid, "status": data})
        except requests.RequestException as exc:
            log.warning("cannot forward %s's status to the leader: %s", client_id, exc)

    def on_secagg(self, data: Any = None) -> dict[str, Any]:  # EV_SECAGG
        return {"accepted": False, "reason": "not_sharded: secure aggregation runs on one process; connect this "
                                             "client to the leader"}


def create_edge(app: Flask, socketio: SocketIO, config: ServerConfig, limits: RateLimits) -> Flask:
    if not config.leader_url or not config.message_queue:
        raise ValueError("an edge needs --leader-url and --message-queue (the leader's Redis)")
    edge_id = config.edge_id or f"{socket.gethostname()}:{config.port}"
    leader = Leader(config.leader_url, config.admin_token)
    collection = Collection(None)
    bus = Bus(config.message_queue, edge_id, collection)
    collection.claim = bus.claim  # one update a client and round, across the tier
    enrollment = Enrollment(config.enrollment_token, secret=tier_secret(config.admin_token),
                            once=bus.redeem)  # a challenge from any edge, redeemed once in the tier
    edge = Edge(config, edge_id, socketio, leader, bus, collection, enrollment, limits)
    edge.models = Models(leader)
    edge.metrics_registry = make_registry(EdgeCollector(edge))
    app.extensions["meshfed"] = edge
    socketio.on_namespace(EdgeNamespace(edge))
    app.register_blueprint(bp)
    app.register_blueprint(ops_bp)
    return app
