"""Swarm: N protocol-level clients against a real server, to see what one server process holds.

Each simulated client is what the server sees of a real one, without the training: its own RSA key (made once,
kept in --key-dir), a registration signed over a fresh challenge, a Socket.IO websocket on /fl held for the whole
run, and for each `train` the model downloaded over HTTP and a real signed update posted (a small fixed delta in
the model's shapes, encoded once per model version). The clients live in --processes worker processes, each one
asyncio loop (python-socketio's AsyncClient over aiohttp), so thousands of them fit on 2 cores.

The swarm starts its own server (run_server.py on 127.0.0.1, synthetic data, --model mlp: 797 KB updates). Every
simulated client shares 127.0.0.1, so the server's per-address rate limits are turned off; the per-client ones
stay. It waits until all N are connected, starts the run and measures:

  connect       seconds from a client's first try to its welcome (p50, p90, max), reconnects
  idle          the server's CPU (in cores) with every client connected and no round (--idle seconds)
  per round     asked / accepted / refused / lost (asked, never answered) and the round's seconds
  server        peak RSS, threads and open fds; CPU seconds per accepted update over the rounds
  /healthz      latency sampled every 0.25 s from the first connect to the end, and apart while clients
                connect, while all idle and during the rounds
  mass exit     then every client at once (its worker processes SIGKILLed): seconds until the server counts none
                online, /healthz meanwhile, and whether the server's processes survived

    python3 bench/swarm.py --clients 200 --rounds 2                          # the CI version (tests/test_swarm.py)
    python3 bench/swarm.py --clients 1000 --wsgi gunicorn --out bench/results/swarm_1000.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
import requests
import socketio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from client.patient import RECONNECT, PatientAsyncClient  # noqa: E402
from shared import crypto  # noqa: E402
from shared.cluster import Cluster, free_port, loopback_nginx_conf, wait_until  # noqa: E402
from shared.protocol import (EV_TRAIN, NAMESPACE, TrainRequest, UpdateHeader, decode_weights,  # noqa: E402
                             encode_weights, pack_update, sha256_hex, signed_registration)

NUM_EXAMPLES = 600  # what each simulated client registers (McMahan's 600 a client)


# --- a worker process: many clients on one asyncio loop ------------------------------------------------------

class SwarmClient:
    """One simulated client: connects with a signed registration, answers each `train` with a signed update."""

    def __init__(self, worker: "Worker", client_id: str, key: Any):
        self.worker, self.client_id, self.key = worker, client_id, key
        self.sio = PatientAsyncClient(reconnection=True, http_session=worker.ws_http, **RECONNECT)
        self.sio.on("connect", self.on_connect, namespace=NAMESPACE)
        self.sio.on("disconnect", self.on_disconnect, namespace=NAMESPACE)
        self.sio.on(EV_TRAIN, self.on_train, namespace=NAMESPACE)
        self.tried: float | None = None

    async def auth(self) -> dict[str, Any]:
        status, _, body = await self.worker.fetch("GET", "/api/challenge",  # this client's edge: sticky by id
                                                  headers={"X-Meshfed-Client": self.client_id})
        challenge = json.loads(body)["challenge"] if status == 200 else "unavailable"
        return signed_registration(self.key, self.client_id, NUM_EXAMPLES, challenge,
                                   self.worker.token).to_dict()

    async def connect(self) -> None:
        self.tried = time.monotonic()
        while True:
            try:
                await self.sio.connect(self.worker.url, namespaces=[NAMESPACE], auth=self.auth,
                                       headers={"X-Meshfed-Client": self.client_id}, transports=["websocket"])
                return
            except socketio.exceptions.ConnectionError as exc:
                self.worker.say("connect_error", client=self.client_id, reason=str(exc)[:200])
                await asyncio.sleep(1.0 + self.worker.rng.random() * 2.0)

    async def on_connect(self) -> None:
        self.worker.say("connected", client=self.client_id, seconds=round(time.monotonic() - self.tried, 4))

    async def on_disconnect(self, reason: Any = None) -> None:
        self.tried = time.monotonic()  # a reconnect's time counts from here
        if not self.worker.stopping:  # python-socketio's reason: server disconnect, ping timeout, transport error
            self.worker.say("disconnected", client=self.client_id, reason=str(reason))

    async def on_train(self, data: dict[str, Any]) -> None:
        asyncio.get_running_loop().create_task(self.answer(TrainRequest.from_dict(data)))

    async def answer(self, request: TrainRequest) -> None:
        w = self.worker
        w.say("asked", client=self.client_id, round=request.round)
        started = time.monotonic()
        try:
            await asyncio.sleep(w.rng.random() * w.train_seconds)
            payload, digest = await w.payload(request, self.client_id)
            header = UpdateHeader(run_id=request.run_id, round=request.round, model_version=request.model_version,
                                  client_id=self.client_id, num_examples=NUM_EXAMPLES, payload_sha256=digest)
            header = replace(header, signature=crypto.sign(self.key, header.canonical_bytes()))
            status, kind, body = await w.fetch("POST", "/api/update", data=pack_update(header, payload),
                                               headers={"Content-Type": "application/octet-stream",
                                                        "X-Meshfed-Client": self.client_id})
            reply = json.loads(body) if kind == "application/json" else {}
            verdict = "accepted" if status == 200 else "late" if status == 202 else \
                f"refused: {reply.get('reason', status)}"
        except Exception as exc:  # the server dropped or timed out the request: counted, never raised
            verdict = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
        w.say("verdict", client=self.client_id, round=request.round, verdict=verdict,
              seconds=round(time.monotonic() - started, 4))


class Worker:
    """A process's clients, its two HTTP session pools, and the cache of each model version's update."""

    def __init__(self, url: str, token: str, ids: list[str], key_dir: str, download: bool, seed: int,
                 train_seconds: float = 0.0, connect_rate: float = 100.0):
        self.url, self.token, self.ids, self.key_dir, self.download = url, token, ids, key_dir, download
        self.train_seconds = train_seconds  # each answer waits up to this long, as if it trained
        self.connect_rate = connect_rate    # this worker's new connections a second
        self.rng = random.Random(seed)
        self.stopping = False
        self._payloads: dict[int, asyncio.Future] = {}
        self._out = sys.stdout

    def say(self, event: str, **fields: Any) -> None:
        self._out.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")
        self._out.flush()

    async def fetch(self, method: str, path: str, **kwargs: Any) -> tuple[int, str, bytes]:
        """(status, content type, body) of one request, sent again (twice at most) when its connection dropped or
        was reset, as client/patient.py's session does for real clients."""
        for attempt in range(3):
            try:
                async with self.http.request(method, self.url + path, **kwargs) as r:
                    return r.status, r.content_type, await r.read()
            except aiohttp.ClientConnectionError:
                if attempt == 2:
                    raise
                await asyncio.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    async def model(self, version: int, client_id: str) -> bytes:
        status, _, body = await self.fetch("GET", f"/api/model/{version}", headers={"X-Meshfed-Client": client_id})
        if status != 200:
            raise ValueError(f"GET /api/model/{version}: {status}")
        return body

    async def payload(self, request: TrainRequest, client_id: str) -> tuple[bytes, str]:
        """Download the model (each client, unless --no-download) and the update for its version (made once)."""
        if request.compression != "none":
            raise ValueError(f"the swarm posts float32 updates; the run asks for {request.compression!r}")
        body = await self.model(request.model_version, client_id) if self.download else None
        if request.model_version not in self._payloads:
            future = self._payloads[request.model_version] = asyncio.get_running_loop().create_future()
            try:  # others of this worker asked for the version meanwhile wait on the future
                weights = decode_weights(body if body is not None else await self.model(request.model_version,
                                                                                        client_id))
            except Exception as exc:  # they fail with it too (counted), and the next asks again
                del self._payloads[request.model_version]
                future.set_exception(exc)
                future.exception()  # retrieved: asyncio says nothing when no other client was waiting
                raise
            payload = encode_weights({name: np.full_like(w, 1e-4) for name, w in weights.items()})
            future.set_result((payload, sha256_hex(payload)))
        return await self._payloads[request.model_version]

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        keys = [crypto.load_or_create_key(self.key_dir, cid) for cid in self.ids]  # cached across runs
        self.say("ready", clients=len(self.ids))
        await loop.run_in_executor(None, sys.stdin.readline)  # the swarm says when to connect
        timeout = aiohttp.ClientTimeout(total=300)
        # an idle connection is dropped after 1 s, before gunicorn's keepalive (2 s) closes it under a request
        http_pool = aiohttp.TCPConnector(limit=0, keepalive_timeout=1.0)
        async with aiohttp.ClientSession(connector=http_pool, timeout=timeout) as http, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as ws_http:
            self.http, self.ws_http = http, ws_http
            clients = [SwarmClient(self, cid, key) for cid, key in zip(self.ids, keys)]
            for client in clients:  # a ramp, not a stampede: --connect-rate a second over all workers
                loop.create_task(client.connect())
                await asyncio.sleep(1.0 / self.connect_rate)
            await stop.wait()
            self.stopping = True
            await asyncio.gather(*(c.sio.disconnect() for c in clients), return_exceptions=True)


def worker_main(args: argparse.Namespace) -> None:
    ids = [f"{args.prefix}{i}" for i in range(args.first, args.first + args.count)]
    token = os.environ["MESHFED_ENROLLMENT_TOKEN"]
    asyncio.run(Worker(args.url, token, ids, args.key_dir, not args.no_download, args.first,
                       args.train_seconds, args.connect_rate).run())


# --- the swarm: server, workers, samples, report -------------------------------------------------------------

class Sampler(threading.Thread):
    """Every 0.25 s: the leader's /healthz latency and the server side's RSS, threads and open fds (their peaks):
    the given processes (the leader; a tier's edges, Redis and nginx) and those they started (gunicorn's worker,
    the evaluation process)."""

    def __init__(self, url: str, pids: list[int]):
        super().__init__(daemon=True)
        self.url, self.procs = url, [psutil.Process(pid) for pid in pids]
        self.latencies: list[tuple[float, float]] = []  # (when, seconds)
        self.failures = 0
        self.peak = {"rss_mb": 0.0, "threads": 0, "fds": 0}
        self.stop = threading.Event()

    def between(self, start: float, end: float = float("inf")) -> list[float]:
        return [seconds for when, seconds in self.latencies if start <= when < end]

    def tree(self) -> list[psutil.Process]:
        return [q for p in self.procs if p.is_running() for q in (p, *p.children(recursive=True))]

    def cpu_seconds(self) -> float:
        return sum(t.user + t.system for t in (p.cpu_times() for p in self.tree()))

    def run(self) -> None:
        while not self.stop.wait(0.25):
            started = time.monotonic()
            try:
                ok = requests.get(f"{self.url}/healthz", timeout=5).ok
            except requests.RequestException:
                ok = False
            self.latencies.append((started, time.monotonic() - started))
            self.failures += not ok
            try:
                tree = self.tree()
                now = {"rss_mb": sum(p.memory_info().rss for p in tree) / 2**20,
                       "threads": sum(p.num_threads() for p in tree), "fds": sum(p.num_fds() for p in tree)}
            except psutil.Error:  # the server is gone: the run's wait says so
                continue
            self.peak = {k: max(self.peak[k], now[k]) for k in now}


class Events:
    """What the workers say, gathered from their stdout by one thread each."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connect_seconds: dict[str, float] = {}
        self.connects = Counter()
        self.disconnects = Counter()  # by python-socketio's reason
        self.connect_errors = Counter()
        self.ready = 0
        self.asked: dict[int, set[str]] = defaultdict(set)
        self.verdicts: dict[int, dict[str, str]] = defaultdict(dict)

    def read(self, stream: Any) -> None:
        for line in stream:
            e = json.loads(line)
            with self.lock:
                kind = e["event"]
                if kind == "ready":
                    self.ready += 1
                elif kind == "connected":
                    self.connects[e["client"]] += 1
                    self.connect_seconds.setdefault(e["client"], e["seconds"])
                elif kind == "disconnected":
                    self.disconnects[e.get("reason", "?")] += 1
                elif kind == "connect_error":
                    self.connect_errors[e["reason"]] += 1
                elif kind == "asked":
                    self.asked[e["round"]].add(e["client"])
                elif kind == "verdict":
                    self.verdicts[e["round"]][e["client"]] = e["verdict"]

    @property
    def online(self) -> int:
        with self.lock:
            return len(self.connects)


def mass_disconnect(cluster: Cluster, workers: list[subprocess.Popen], sampler: "Sampler") -> dict[str, Any]:
    """Every client gone at once (the workers SIGKILLed: the kernel closes their sockets): how long until the
    server counts none online, /healthz meanwhile, and whether the server's processes are the same ones after
    (gunicorn's master once SIGKILLed a worker that went silent on 1,000 disconnects: issue 20)."""
    before = sorted(p.pid for p in sampler.tree())
    print("swarm: every client gone at once (their workers SIGKILLed)", file=sys.stderr)
    killed = time.monotonic()
    for proc in workers:
        proc.kill()
    cluster.wait_until(lambda: cluster.status()["clients_online"] == 0, 600, "every client to be gone", every=0.25)
    gone_in = time.monotonic() - killed
    time.sleep(2.0)  # and a little after
    return {"clients_gone_in_s": round(gone_in, 2), "healthz_s": spread(sampler.between(killed)),
            "server_processes_unchanged": sorted(p.pid for p in sampler.tree()) == before,
            "answers_after": cluster.api("GET", "/healthz").ok}


def start_tier(cluster: Cluster, args: argparse.Namespace, queue: str, serving: list[str]) -> str:
    """--edges edge servers of the leader and an nginx in front of them (the shipped nginx.conf, on loopback);
    returns nginx's URL, where the clients go."""
    ports = [free_port() for _ in range(args.edges)]
    for i, port in enumerate(ports):
        cluster.start_edge(f"edge{i}", port, queue, *serving, "--log-level", "WARNING")
    for port in ports:
        cluster.wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).ok, 60, "an edge")
    port = free_port()
    conf = loopback_nginx_conf(cluster.workdir, port, cluster.port, ports)
    cluster.start_program([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-e",
                           str(cluster.workdir / "nginx-error.log"), "-g", "daemon off;"], "nginx.log")
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: requests.get(url + "/healthz", timeout=5).ok, 30, "nginx")
    print(f"swarm: leader, {args.edges} edges, redis and nginx up; clients go to {url}", file=sys.stderr)
    return url


def edge_accepted(cluster: Cluster, name: str) -> int | None:
    """How many updates an edge took, from its /metrics (None: it is not running)."""
    if cluster.edges[name].poll() is not None:
        return None
    port = cluster.edges[name].args[cluster.edges[name].args.index("--port") + 1]
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found = re.search(r'meshfed_edge_updates_total\{outcome="accepted"\} ([0-9.e+]+)', text)
    return int(float(found.group(1))) if found else 0


def kill_edge(cluster: Cluster, events: Events, args: argparse.Namespace) -> dict[str, Any]:
    """SIGKILL edge0 once a third of round --kill-edge-round's updates were answered: the round must complete
    with the other edges' updates, and edge0's clients reconnect through nginx to the others."""
    round_no, proc = args.kill_edge_round, cluster.edges["edge0"]
    wait_until(lambda: len(events.verdicts[round_no]) >= args.clients // 3, 3600, "a third of the round", 0.02)
    with events.lock:
        answered = len(events.verdicts[round_no])
    print(f"swarm: edge0 SIGKILLed in round {round_no} ({answered} updates answered)", file=sys.stderr)
    proc.kill()
    proc.wait()
    return {"edge": "edge0", "round": round_no, "updates_answered_before": answered}


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": round(statistics.median(ordered), 4), "p90": round(at(0.9), 4), "p99": round(at(0.99), 4),
            "max": round(ordered[-1], 4)}


def swarm(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="meshfed-swarm-"))
    with Cluster(workdir) as cluster:
        serving = ["--wsgi", args.wsgi] + (["--threads", str(args.threads or args.clients + 50)]
                                           if args.wsgi == "gunicorn" else [])
        unlimited = ["--rate-limit", "connect-per-address=off", "--rate-limit", "update-per-address=off"]
        queue = cluster.start_redis() if args.edges else None
        cluster.start_server("--dataset", "synthetic", "--model", "mlp", "--num-rounds", str(args.rounds),
                             "--min-clients", str(args.clients), "--round-timeout", str(args.round_timeout),
                             "--max-batches", "1", "--eval-limit", "1000", *serving, *unlimited,
                             *(["--message-queue", queue] if queue else []), "--log-level", "WARNING")
        cluster.wait_ready()
        url, watched = cluster.url, [cluster.server]
        if args.edges:  # the tier: clients reach the edges through nginx, sticky by client id
            edge_serving = serving if args.edge_wsgi == args.wsgi else ["--wsgi", args.edge_wsgi] + (
                ["--threads", str(args.threads or args.clients + 50)] if args.edge_wsgi != "werkzeug" else [])
            url, watched = start_tier(cluster, args, queue, edge_serving + unlimited), \
                [cluster.server, *cluster.edges.values(), *cluster.programs]
        key_dir = args.key_dir or str(Path.home() / ".cache" / "meshfed-swarm-keys")
        events, workers, readers = Events(), [], []
        per = -(-args.clients // args.processes)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MESHFED_ENROLLMENT_TOKEN": cluster.enrollment_token}
        for first in range(0, args.clients, per):
            proc = subprocess.Popen(
                [sys.executable, __file__, "--worker", "--url", url, "--first", str(first),
                 "--count", str(min(per, args.clients - first)), "--key-dir", key_dir, "--prefix", args.prefix,
                 "--train-seconds", str(args.train_seconds),
                 "--connect-rate", str(args.connect_rate / args.processes),
                 *(["--no-download"] if args.no_download else [])],
                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            workers.append(proc)
            reader = threading.Thread(target=events.read, args=(proc.stdout,), daemon=True)
            reader.start()
            readers.append(reader)
        try:
            wait_until(lambda: events.ready == len(workers), 600, "the workers' keys")
            print(f"swarm: {len(workers)} workers ready; connecting {args.clients} clients", file=sys.stderr)
            sampler = Sampler(cluster.url, [p.pid for p in watched])
            sampler.start()
            connecting = time.monotonic()
            for proc in workers:
                proc.stdin.write("connect\n")
                proc.stdin.flush()
            said = -1

            def all_online() -> bool:
                nonlocal said
                if events.online // 100 != said // 100:
                    said = events.online
                    print(f"swarm: clients online {said}/{args.clients}", file=sys.stderr)
                return events.online >= args.clients and cluster.status()["clients_online"] >= args.clients
            cluster.wait_until(all_online, args.connect_timeout, f"{args.clients} clients to connect", every=0.5)
            connected_in = time.monotonic() - connecting
            idle_from, cpu_idle = time.monotonic(), sampler.cpu_seconds()  # all connected, no round yet
            time.sleep(args.idle)
            idle_cpu = (sampler.cpu_seconds() - cpu_idle) / (time.monotonic() - idle_from)
            cpu_before = sampler.cpu_seconds()
            cluster.api("POST", "/api/start", admin=True).raise_for_status()
            started = time.monotonic()

            killed_edge: dict[str, Any] = {}
            if args.kill_edge_round:
                threading.Thread(target=lambda: killed_edge.update(kill_edge(cluster, events, args)),
                                 daemon=True).start()

            def finished() -> bool:
                status = cluster.status()
                return status["state"] in ("finished", "stopped") or status.get("stop_reason") is not None
            cluster.wait_until(finished, args.rounds * (args.round_timeout + 60), f"{args.rounds} rounds", every=0.5)
            run_seconds = time.monotonic() - started
            cpu = sampler.cpu_seconds() - cpu_before
            rounds = cluster.rounds()
            time.sleep(1.0)  # the last verdicts' lines reach their readers
            edge_updates = {name: edge_accepted(cluster, name) for name in cluster.edges}
            rounds_end = time.monotonic()
            mass = mass_disconnect(cluster, workers, sampler)
        finally:
            for proc in workers:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in workers:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if "sampler" in locals():
                sampler.stop.set()
    per_round = []
    for r in rounds:
        asked, verdicts = events.asked[r["round"]], events.verdicts[r["round"]]
        answered = Counter(v.split(":")[0] for v in verdicts.values())
        per_round.append({"round": r["round"], "seconds": round(r["seconds"], 2), "asked": len(asked),
                          "delivered": len(r["clients"]), "accepted": answered["accepted"],
                          "refused": answered["refused"], "failed": answered["failed"], "late": answered["late"],
                          "lost": len(asked - set(verdicts)),
                          "refusals": dict(Counter(v for v in verdicts.values() if v != "accepted").most_common(5))})
    accepted = sum(r["accepted"] for r in per_round)
    return {"benchmark": "swarm", "clients": args.clients, "processes": args.processes, "wsgi": args.wsgi,
            "edges": args.edges, "edge_wsgi": args.edge_wsgi if args.edges else None, "killed_edge": killed_edge,
            "edge_updates_accepted": edge_updates,
            "threads": args.threads or (args.clients + 50 if args.wsgi == "gunicorn" else None),
            "download": not args.no_download, "rounds_asked": args.rounds, "rounds": per_round,
            "connected_in_s": round(connected_in, 2), "connect_s": spread(list(events.connect_seconds.values())),
            "reconnects": sum(n - 1 for n in events.connects.values()), "disconnects": sum(events.disconnects.values()),
            "disconnect_reasons": dict(events.disconnects),
            "connect_errors": dict(events.connect_errors.most_common(5)),
            "run_s": round(run_seconds, 2), "accepted": accepted,
            "lost": sum(r["lost"] for r in per_round), "refused": sum(r["refused"] for r in per_round),
            "failed": sum(r["failed"] for r in per_round),
            "server_cpu_s": round(cpu, 2), "server_cpu_ms_per_accepted_update": round(1000 * cpu / max(accepted, 1), 2),
            "server_peak": {k: round(v, 1) for k, v in sampler.peak.items()},
            "idle_cpu_cores": round(idle_cpu, 3),
            "healthz_s": spread(sampler.between(connecting, rounds_end)),
            "healthz_connecting_s": spread(sampler.between(connecting, idle_from)),
            "healthz_idle_s": spread(sampler.between(idle_from, idle_from + args.idle)),
            "healthz_rounds_s": spread(sampler.between(idle_from + args.idle, rounds_end)),
            "healthz_failures": sampler.failures, "healthz_samples": len(sampler.latencies),
            "mass_disconnect": mass}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=200, help="simulated clients")
    p.add_argument("--processes", type=int, default=2, help="worker processes the clients are spread over")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--wsgi", default="werkzeug", choices=["werkzeug", "gunicorn"], help="the server's --wsgi")
    p.add_argument("--threads", type=int, default=0, help="each server process's gunicorn --threads (0: clients + 50; "
                   "threads are made as needed, and nginx's hash does not give edges even shares)")
    p.add_argument("--round-timeout", type=float, default=300.0, help="the server's --round-timeout")
    p.add_argument("--connect-timeout", type=float, default=600.0, help="seconds for all clients to connect")
    p.add_argument("--idle", type=float, default=5.0, help="seconds all clients stay connected before the run "
                                                            "starts (the idle CPU and /healthz are measured)")
    p.add_argument("--edges", default="0", help="edge servers (--role edge) in front of the leader, with Redis and "
                                                "nginx; 0: clients connect to the leader; a list (0,3) runs each, "
                                                "side by side in one invocation")
    p.add_argument("--edge-wsgi", default="", help="the edges' --wsgi (default: --wsgi); gevent holds a greenlet per "
                                                    "client, not a thread; a list (gunicorn,gevent) runs each")
    p.add_argument("--kill-edge-round", type=int, default=0, help="SIGKILL edge0 while this round collects")
    p.add_argument("--connect-rate", type=float, default=200.0,
                   help="new connections a second, over all workers (faster than the servers admit them, connects "
                        "time out and are tried again: the herd slows itself down)")
    p.add_argument("--train-seconds", type=float, default=0.0,
                   help="each client answers a train request after a random wait of up to this many seconds")
    p.add_argument("--no-download", action="store_true", help="clients do not download the model each round")
    p.add_argument("--url", default="", help=argparse.SUPPRESS)  # the server, for a worker
    p.add_argument("--key-dir", default=None, help="where the clients' RSA keys are kept between runs "
                                                   "(default ~/.cache/meshfed-swarm-keys)")
    p.add_argument("--prefix", default="s", help="client ids are <prefix><n>")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker_main(args)
    if args.clients < 1 or args.processes < 1 or args.rounds < 1:
        p.error("--clients, --processes and --rounds must be at least 1")
    try:
        tiers = [int(n) for n in args.edges.split(",")]
    except ValueError:
        p.error("--edges: a number of edges, or a list such as 0,3")
    if args.kill_edge_round and 0 in tiers:
        p.error("--kill-edge-round needs edges (--edges 3)")
    servings = args.edge_wsgi.split(",") if args.edge_wsgi else [args.wsgi]
    if any(w not in ("werkzeug", "gunicorn", "gevent") for w in servings):
        p.error("--edge-wsgi: werkzeug, gunicorn or gevent, or a list such as gunicorn,gevent")
    configurations = [(n, w) for n in tiers for w in (servings if n else [args.wsgi])]
    results = [swarm(argparse.Namespace(**{**vars(args), "edges": n, "edge_wsgi": w})) for n, w in configurations]
    label = lambda r: f"{r['edges']} edges ({r['edge_wsgi']})" if r["edges"] else "one process"  # noqa: E731
    result = results[0] if len(results) == 1 else {
        "benchmark": "swarm", "configurations": results,
        "vs_first": {label(r): {  # each configuration against the first, as ratios
            "round_seconds": round(statistics.mean(x["seconds"] for x in r["rounds"]) /
                                   statistics.mean(x["seconds"] for x in results[0]["rounds"]), 3),
            "server_cpu_per_update": round(r["server_cpu_ms_per_accepted_update"] /
                                           results[0]["server_cpu_ms_per_accepted_update"], 3)}
            for r in results[1:]}}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
