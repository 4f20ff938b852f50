"""Deployment files checked against the code (no Docker engine here), and a real nginx with TLS in
front of a real leader and follower sharing a real redis-server: clients over https/wss, a dashboard
socket through the same nginx."""
from __future__ import annotations

import json
import queue
import re
import shutil
import signal
import subprocess
import sys

import pytest
import redis
import requests
import socketio
import yaml
from prometheus_client.parser import text_string_to_metric_families

import run_client
import run_server
from tests.conftest import ROOT

C = ROOT / "containers"


def compose() -> dict:
    return yaml.safe_load((C / "docker-compose.yml").read_text())


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_compose_services_match_the_code_flags_ports_and_volumes():
    services = compose()["services"]
    assert set(services) == {"nginx", "redis", "server", "web", "client"}
    server, web, client, nginx = services["server"], services["web"], services["client"], services["nginx"]

    server_args = run_server.parse_args(server["command"])  # every flag must exist in run_server.py
    assert server_args.host == "0.0.0.0" and str(server_args.port) in server["expose"]
    assert server_args.role == "leader" and server_args.wsgi == "gunicorn"
    assert any(v.endswith(":" + server_args.state_dir) for v in server["volumes"])
    assert {"MESHFED_ADMIN_TOKEN", "MESHFED_ENROLLMENT_TOKEN"} <= set(server["environment"])
    assert all(":?" in v for v in server["environment"].values())  # compose refuses to start without them

    web_args = run_server.parse_args(web["command"])  # a follower of that leader, on the same queue
    assert web_args.role == "follower" and web_args.leader_url == f"http://server:{server_args.port}"
    assert web_args.message_queue == server_args.message_queue
    redis_host, redis_port = re.match(r"redis://([^:/]+):(\d+)/", server_args.message_queue).groups()
    assert redis_host in services and redis_port in services[redis_host]["expose"]
    assert web["environment"]["MESHFED_ADMIN_TOKEN"] == server["environment"]["MESHFED_ADMIN_TOKEN"]

    client_args = run_client.parse_args(client["command"])
    assert client_args.server_address == "https://nginx:8443" and client_args.client_index == -1
    assert any(v.endswith(":" + client_args.key_dir) for v in client["volumes"])
    assert any(v.split(":")[1] == client_args.ca_cert for v in client["volumes"])
    assert "8443:8443" in nginx["ports"]
    named = set(compose()["volumes"])
    assert {"server-state", "client-keys"} <= named
    assert all(s["restart"] == "unless-stopped" for s in services.values())

    conf = (C / "nginx.conf").read_text()
    assert f"server server:{server_args.port};" in conf and f"server web:{web_args.port};" in conf
    assert "listen 8443 ssl;" in conf and "proxy_set_header Host $http_host;" in conf
    assert "hash $remote_addr;" in conf and "map $http_x_meshfed_client $socketio_upstream" in conf
    max_body = int(re.search(r"client_max_body_size (\d+)m;", conf).group(1))
    assert max_body > server_args.max_update_mb


def test_dockerfiles_copy_what_exists_and_check_health():
    for name, script in (("Dockerfile.server", "run_server.py"), ("Dockerfile.client", "run_client.py")):
        text = (C / name).read_text()
        for src in re.findall(r"^COPY (\S+) ", text, re.M):
            assert (ROOT / src).exists(), f"{name} copies missing {src}"
        assert f'ENTRYPOINT ["python", "{script}"]' in text and "USER meshfed" in text
    assert "/healthz" in (C / "Dockerfile.server").read_text()
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        r = subprocess.run(["docker", "compose", "-f", str(C / "docker-compose.yml"), "config", "-q"],
                           capture_output=True, text=True, env={"MESHFED_ADMIN_TOKEN": "a",
                                                                "MESHFED_ENROLLMENT_TOKEN": "e", "PATH": "/usr/bin:/bin"})
        assert r.returncode == 0, r.stderr


def nginx_config(tmp_path, leader_port: int, web_port: int, port: int) -> str:
    """The shipped nginx.conf with loopback upstreams, listen address and paths of this test."""
    conf = (C / "nginx.conf").read_text()
    conf = conf.replace("server server:5000;", f"server 127.0.0.1:{leader_port};")
    conf = conf.replace("server web:5000;", f"server 127.0.0.1:{web_port};")
    conf = conf.replace("listen 8443 ssl;", f"listen 127.0.0.1:{port} ssl;")
    conf = conf.replace("/etc/nginx/certs/", f"{tmp_path}/certs/").replace("/tmp/meshfed-nginx", f"{tmp_path}/ngx")
    path = tmp_path / "nginx.conf"
    path.write_text(conf)
    return str(path)


@pytest.fixture
def certs(tmp_path):
    subprocess.run(["bash", str(C / "make-cert.sh")], env={"CERT_DIR": str(tmp_path / "certs"), "PATH": "/usr/bin:/bin"},
                   check=True, capture_output=True)
    return tmp_path / "certs"


def _nginx() -> str:
    path = shutil.which("nginx") or "/usr/sbin/nginx"
    if not shutil.which(path):
        pytest.fail("Debian's nginx is required; run `bash .ci/setup.sh`")
    return path


def test_nginx_accepts_the_shipped_config(tmp_path, certs):
    from shared.cluster import free_port

    r = subprocess.run([_nginx(), "-t", "-c", nginx_config(tmp_path, 5000, 5001, free_port()), "-e", str(tmp_path / "err.log")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "syntax is ok" in r.stderr, r.stderr


def _redis(port: int) -> subprocess.Popen:
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail("Debian's redis-server is required; run `bash .ci/setup.sh`")
    return subprocess.Popen([path, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_scale_out_behind_nginx_with_tls_and_redis(cluster, tmp_path, certs):
    """nginx (TLS) -> a gunicorn leader + a follower sharing a real redis-server: clients train through
    nginx over wss on the leader; a dashboard that nginx sends to the follower starts the run there and
    receives every round live; a second leader refuses to start; the follower refuses clients."""
    from shared.cluster import free_port

    redis_port, web_port, port = free_port(), free_port(), free_port()
    queue_url = f"redis://127.0.0.1:{redis_port}/0"
    redis_server = _redis(redis_port)
    nginx = subprocess.Popen([_nginx(), "-c", nginx_config(tmp_path, cluster.port, web_port, port),
                              "-e", str(tmp_path / "err.log"), "-g", "daemon off;"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    follower = None
    try:
        front, web = f"https://127.0.0.1:{port}", f"http://127.0.0.1:{web_port}"
        cluster.start_server("--dataset", "synthetic", "--model", "mlp", "--num-rounds", "2", "--min-clients", "2",
                             "--eval-limit", "200", "--message-queue", queue_url, "--wsgi", "gunicorn",
                             "--threads", "20", "--log-format", "json", "--proxies", "1")
        cluster.wait_ready()
        follower = cluster._spawn("run_server.py", [
            "--port", str(web_port), "--role", "follower", "--leader-url", cluster.url, "--message-queue", queue_url,
            "--state-dir", "follower-state", "--proxies", "1"], "follower.log")
        cluster.wait_until(lambda: requests.get(web + "/readyz", timeout=5).json()["ready"], 60, "the follower")

        second = subprocess.run([sys.executable, str(ROOT / "run_server.py"), "--port", str(free_port()),
                                 "--state-dir", str(tmp_path / "second"), "--message-queue", queue_url],
                                capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert second.returncode != 0 and "another leader holds meshfed:leader" in second.stderr

        refusals: list = []
        intruder = socketio.Client()
        intruder.on("connect_error", refusals.append, namespace="/fl")
        with pytest.raises(socketio.exceptions.ConnectionError):
            intruder.connect(web, namespaces=["/fl"], auth={"client_id": "x"}, transports=["websocket"], wait_timeout=10)
        assert refusals and refusals[0]["message"].startswith("not_leader")
        assert requests.get(web + "/api/status", timeout=5).status_code == 421

        events: queue.Queue = queue.Queue()
        dash = socketio.Client(ssl_verify=True, http_session=_session(certs))  # no X-Meshfed-Client: -> web
        dash.on("metrics_update", events.put, namespace="/dashboard")
        dash.connect(front, namespaces=["/dashboard"], auth={"token": cluster.admin_token}, transports=["websocket"])
        for i in range(2):
            cluster.clients[f"c{i}"] = cluster._spawn("run_client.py", [
                "--client-id", f"c{i}", "--server-address", front, "--ca-cert", str(certs / "meshfed-ca.crt"),
                "--key-dir", "keys", "--dataset", "synthetic",
                "--model", "mlp", "--partition", "iid", "--num-clients", "2", "--client-index", str(i),
                "--max-samples", "300"], f"c{i}.log")
        cluster.wait_until(lambda: cluster.status()["clients_online"] == 2, 60, "clients through nginx")
        assert dash.call("update_config", {"num_rounds": 0}, namespace="/dashboard", timeout=15)["fields"]
        reply = dash.call("start_training", {}, namespace="/dashboard", timeout=15)  # forwarded to the leader
        assert reply["ok"] and reply["run_id"] == cluster.status()["run_id"]
        cluster.wait_until(lambda: cluster.status()["state"] == "finished", 90, "2 rounds through nginx")
        assert [events.get(timeout=10)["round"] for _ in range(2)] == [1, 2]  # leader -> redis -> follower
        dash.disconnect()
        assert all("accepted" in (cluster.workdir / f"c{i}.log").read_text() for i in range(2))
        # the leader ran on gunicorn, and its log is JSON throughout: our lines, gunicorn's, the banner
        lines = [json.loads(line) for line in (cluster.workdir / "server.log").read_text().splitlines() if line]
        assert any(entry["message"].startswith("Booting worker") for entry in lines)
        assert any(entry["message"].startswith("round 2") for entry in lines)
        # without the CA the client refuses the self-signed certificate
        r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", front + "/healthz"],
                           capture_output=True, text=True)
        assert r.stdout == "000"

        def leader_up() -> float:
            text = requests.get(web + "/metrics", timeout=5).text
            return next(f for f in text_string_to_metric_families(text) if f.name == "meshfed_leader_up").samples[0].value

        assert leader_up() == 1
        cluster.kill(cluster.server, signal.SIGTERM)  # the follower stays up and says the leader is gone
        r = requests.get(web + "/readyz", timeout=10)
        assert r.status_code == 503 and r.json()["checks"] == {"leader_reachable": False} and leader_up() == 0
        # it left cleanly: the lock is free now, a new leader need not wait for it to expire
        assert redis.Redis.from_url(queue_url).get("meshfed:leader") is None
    finally:
        nginx.send_signal(signal.SIGTERM)  # fast shutdown: SIGQUIT would wait for open websockets
        nginx.wait(timeout=20)
        if follower is not None:
            _stop(follower)
        cluster.stop_all()
        _stop(redis_server)


def _session(certs):
    s = requests.Session()
    s.verify = str(certs / "meshfed-ca.crt")
    return s
