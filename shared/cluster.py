"""A local cluster of real processes: a meshfed server and clients started from run_server.py and
run_client.py on 127.0.0.1, each stopped by PID. The demo (run_demo.py), the tests and the benchmarks all run
meshfed through it. It imports nothing of meshfed: it talks to the processes as a user would (HTTP)."""
from __future__ import annotations

import ctypes
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import requests

ROOT = Path(__file__).resolve().parents[1]  # the checkout: where run_server.py and run_client.py are


def _prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _prctl()  # looked up here, not in a forked child (where loading a library could deadlock)
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when the thread that started it ends, even by SIGKILL: a launcher
    (the demo, a test, run_client.py --local-clients) that dies takes its processes with it. Elsewhere a no-op."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll predicate until it returns something truthy (a request that fails counts as not yet) and return
    that; TimeoutError naming `what` after `timeout` seconds. Every wait of the tests and benchmarks is this."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
            if value:
                return value
        except requests.RequestException:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def loopback_nginx_conf(workdir: str | Path, port: int, leader_port: int, client_ports: list[int],
                        web_port: int | None = None) -> Path:
    """containers/nginx.conf for 127.0.0.1: plain HTTP on `port`, clients spread over `client_ports` (edges, or
    the leader's own), the rest to the leader; its temporary files and pid under `workdir`; 4 workers, as
    their open files are capped per process (20,000 on our machines) and a client holds 2."""
    conf = (ROOT / "containers" / "nginx.conf").read_text()
    clients = "".join(f"server 127.0.0.1:{p}; " for p in client_ports)
    conf = re.sub(r"(upstream meshfed_clients \{[^}]*?)server server:5000;", lambda m: m.group(1) + clients, conf)
    conf = conf.replace("server server:5000;", f"server 127.0.0.1:{leader_port};")
    conf = conf.replace("server web:5000;", f"server 127.0.0.1:{web_port or leader_port};")
    conf = conf.replace("listen 8443 ssl;", f"listen 127.0.0.1:{port};")
    conf = re.sub(r"\n\s*ssl_[a-z_]+ [^;]*;", "", conf).replace("X-Forwarded-Proto https;", "X-Forwarded-Proto http;")
    conf = conf.replace("/tmp/meshfed-nginx", f"{workdir}/nginx")
    conf = conf.replace("worker_processes auto;", "worker_processes 4;")  # 4 × the fds a process may open here
    path = Path(workdir) / "nginx.conf"
    path.write_text(conf)
    return path


class Cluster:
    """A server and clients as real processes on 127.0.0.1, each stopped by PID on exit.

    Used by the demo, the integration tests and the benchmarks alike.
    """

    def __init__(self, workdir: str | Path, port: int | None = None, log_to_files: bool = True):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_token = secrets.token_hex(16)
        self.enrollment_token = secrets.token_hex(16)
        self.log_to_files = log_to_files
        self.server: subprocess.Popen | None = None
        self.clients: dict[str, subprocess.Popen] = {}
        self.edges: dict[str, subprocess.Popen] = {}     # edge servers (--role edge) of this leader
        self.programs: list[subprocess.Popen] = []        # redis-server, nginx: stopped after the rest
        self._logs: list[Any] = []

    def _spawn(self, script: str, args: list[str], log_name: str, prefix: list[str] | None = None) -> subprocess.Popen:
        """Start one of our scripts; `prefix` runs it elsewhere (tests: `ip netns exec <ns>`). The tokens
        travel in the environment, not on the command line, where `ps` would show them. It dies with the thread
        that started it (die_with_parent): start processes from a thread that outlives them."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT),
               "MESHFED_ADMIN_TOKEN": self.admin_token, "MESHFED_ENROLLMENT_TOKEN": self.enrollment_token}
        out = open(self.workdir / log_name, "ab") if self.log_to_files else subprocess.DEVNULL
        if self.log_to_files:
            self._logs.append(out)
        return subprocess.Popen([*(prefix or []), sys.executable, str(ROOT / script), *args], cwd=self.workdir,
                                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=die_with_parent)

    def start_server(self, *args: str, state_dir: str = "state") -> subprocess.Popen:
        self.server = self._spawn("run_server.py", ["--port", str(self.port), "--state-dir", state_dir, *args],
                                  "server.log")
        return self.server

    def start_edge(self, name: str, port: int, queue: str, *args: str) -> subprocess.Popen:
        """An edge server (--role edge, app/edge.py) of this cluster's leader, sharing its message queue."""
        self.edges[name] = self._spawn("run_server.py", ["--role", "edge", "--edge-id", name, "--port", str(port),
                                                         "--leader-url", self.url, "--message-queue", queue, *args],
                                       f"{name}.log")
        return self.edges[name]

    def start_program(self, argv: list[str], log_name: str) -> subprocess.Popen:
        """Another program the cluster needs (redis-server, nginx), stopped by PID after the rest."""
        out = open(self.workdir / log_name, "ab")
        self._logs.append(out)
        proc = subprocess.Popen(argv, cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        self.programs.append(proc)
        return proc

    def start_redis(self) -> str:
        """Debian's redis-server on a free loopback port, without persistence; returns its URL once it answers."""
        import redis  # only where a message queue is used
        port = free_port()
        self.start_program(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--maxclients", "10000"], "redis.log")
        url = f"redis://127.0.0.1:{port}/0"

        def up() -> bool:
            try:
                return redis.Redis.from_url(url).ping()
            except redis.ConnectionError:
                return False
        wait_until(up, 30, "redis-server")
        return url

    def start_client(self, client_id: str, *args: str) -> subprocess.Popen:
        self.clients[client_id] = self._spawn("run_client.py", [
            "--client-id", client_id, "--server-address", self.url,
            *(args if "--key-dir" in args else ("--key-dir", "keys", *args))], f"{client_id}.log")
        return self.clients[client_id]

    def start_clients(self, prefix: str, count: int, *args: str) -> subprocess.Popen:
        """`count` clients <prefix>-0..count-1, forked by one launcher (run_client.py --local-clients),
        which stops them when it is stopped; their logs interleave in <prefix>.log. One is started alone."""
        if count == 1:
            return self.start_client(f"{prefix}-0", *args)
        return self.start_client(prefix, "--local-clients", str(count), *args)

    def api(self, method: str, path: str, admin: bool = False, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.admin_token}"} if admin else {}
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def wait_until(self, predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
        """wait_until, also failing at once (naming the log) if the server exits meanwhile."""
        def check() -> Any:
            if self.server is not None and self.server.poll() is not None:
                raise RuntimeError(f"server exited with {self.server.returncode} while waiting for {what}; "
                                   f"see {self.workdir / 'server.log'}")
            return predicate()
        return wait_until(check, timeout, what, every)

    def wait_ready(self, timeout: float = 60) -> None:
        self.wait_until(lambda: self.api("GET", "/api/status").ok, timeout, "the server to answer")

    def rounds(self) -> list[dict[str, Any]]:
        return self.api("GET", "/api/metrics").json()["rounds"]

    def status(self) -> dict[str, Any]:
        return self.api("GET", "/api/status").json()

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, sig)
            proc.wait(timeout=30)

    def stop_all(self) -> None:
        """SIGTERM every process we started, then SIGKILL what is left after 10 s."""
        for procs in ([p for p in [*self.clients.values(), *self.edges.values(), self.server] if p is not None],
                      self.programs):
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            deadline = time.monotonic() + 10
            for p in procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for f in self._logs:
            f.close()
        self._logs.clear()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_all()
