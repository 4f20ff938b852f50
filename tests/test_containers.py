"""Deployment files checked against the code (no Docker engine here), and a real nginx with TLS in
front of a real server: clients over https/wss, a dashboard socket through the same nginx."""
from __future__ import annotations

import queue
import re
import shutil
import signal
import subprocess

import pytest
import socketio
import yaml

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
    assert set(services) == {"nginx", "server", "client"}
    server, client, nginx = services["server"], services["client"], services["nginx"]

    server_args = run_server.parse_args(server["command"])  # every flag must exist in run_server.py
    assert server_args.host == "0.0.0.0" and str(server_args.port) in server["expose"]
    assert any(v.endswith(":" + server_args.state_dir) for v in server["volumes"])
    assert {"MESHFED_ADMIN_TOKEN", "MESHFED_ENROLLMENT_TOKEN"} <= set(server["environment"])
    assert all(":?" in v for v in server["environment"].values())  # compose refuses to start without them

    client_args = run_client.parse_args(client["command"])
    assert client_args.server_address == "https://nginx:8443" and client_args.client_index == -1
    assert any(v.endswith(":" + client_args.key_dir) for v in client["volumes"])
    assert any(v.split(":")[1] == client_args.ca_cert for v in client["volumes"])
    assert "8443:8443" in nginx["ports"]
    named = set(compose()["volumes"])
    assert {"server-state", "client-keys"} <= named
    assert all(s["restart"] == "unless-stopped" for s in services.values())

    conf = (C / "nginx.conf").read_text()
    assert f"server server:{server_args.port};" in conf and "listen 8443 ssl;" in conf
    assert "proxy_set_header Host $http_host;" in conf and "hash $remote_addr;" in conf
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


def nginx_config(tmp_path, backend_port: int, port: int) -> str:
    """The shipped nginx.conf with loopback upstream, listen address and paths of this test."""
    conf = (C / "nginx.conf").read_text()
    conf = conf.replace("server server:5000;", f"server 127.0.0.1:{backend_port};")
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
    from run_demo import free_port

    r = subprocess.run([_nginx(), "-t", "-c", nginx_config(tmp_path, 5000, free_port()), "-e", str(tmp_path / "err.log")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "syntax is ok" in r.stderr, r.stderr


def test_clients_train_through_nginx_over_tls(cluster, tmp_path, certs):
    from run_demo import free_port

    port = free_port()
    nginx = subprocess.Popen([_nginx(), "-c", nginx_config(tmp_path, cluster.port, port), "-e", str(tmp_path / "err.log"),
                              "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        front = f"https://127.0.0.1:{port}"
        cluster.start_server("--dataset", "synthetic", "--model", "mlp", "--num-rounds", "2", "--min-clients", "2",
                             "--eval-limit", "200")
        cluster.wait_ready()
        events: queue.Queue = queue.Queue()
        dash = socketio.Client(ssl_verify=True, http_session=_session(certs))
        dash.on("metrics_update", events.put, namespace="/dashboard")
        dash.connect(front, namespaces=["/dashboard"], auth={"token": cluster.admin_token}, transports=["websocket"])
        for i in range(2):
            cluster.clients[f"c{i}"] = cluster._spawn("run_client.py", [
                "--client-id", f"c{i}", "--server-address", front, "--ca-cert", str(certs / "meshfed-ca.crt"),
                f"--enrollment-token={cluster.enrollment_token}", "--key-dir", "keys", "--dataset", "synthetic",
                "--model", "mlp", "--partition", "iid", "--num-clients", "2", "--client-index", str(i),
                "--max-samples", "300"], f"c{i}.log")
        cluster.wait_until(lambda: cluster.status()["clients_online"] == 2, 60, "clients through nginx")
        cluster.api("POST", "/api/start", admin=True).raise_for_status()
        cluster.wait_until(lambda: cluster.status()["state"] == "finished", 90, "2 rounds through nginx")
        assert [events.get(timeout=10)["round"] for _ in range(2)] == [1, 2]  # pushed live through nginx
        dash.disconnect()
        assert all("accepted" in (cluster.workdir / f"c{i}.log").read_text() for i in range(2))
        # without the CA the client refuses the self-signed certificate
        r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", front + "/healthz"],
                           capture_output=True, text=True)
        assert r.stdout == "000"
    finally:
        nginx.send_signal(signal.SIGTERM)  # fast shutdown: SIGQUIT would wait for open websockets
        nginx.wait(timeout=20)


def _session(certs):
    import requests

    s = requests.Session()
    s.verify = str(certs / "meshfed-ca.crt")
    return s
