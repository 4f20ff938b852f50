"""Operations endpoints: liveness, readiness and JSON logs (the /metrics scrape of a real server is
in test_integration.py)."""
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from app.config import RunConfig, ServerConfig
from shared.log import setup_logging


def test_readyz_goes_unready_when_the_state_dir_is_not_writable(tmp_path):
    state = tmp_path / "state"
    app = create_app(ServerConfig(state_dir=str(state), admin_token="a", enrollment_token="e",
                                  run=RunConfig(dataset="synthetic", model="mlp")))
    client = app.test_client()
    assert client.get("/healthz").get_json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.get_json()["ready"] is True
    state.rename(tmp_path / "moved")  # the state dir vanishes (root ignores chmod, so move it away)
    r = client.get("/readyz")
    assert r.status_code == 503 and r.get_json()["checks"]["state_dir_writable"] is False
    assert client.get("/healthz").status_code == 200  # alive, just not ready
    (tmp_path / "moved").rename(state)
    assert client.get("/readyz").status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))}
    assert families["meshfed_clients_connected"].samples[0].value == 0
    app.extensions["meshfed"].store.close()


def test_json_logs_are_one_object_per_line(tmp_path, capsys):
    log_file = tmp_path / "log.jsonl"
    setup_logging("INFO", str(log_file), "json")
    logging.getLogger("meshfed.test").info("round %d done", 3)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("meshfed.test").exception("failed")
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert lines[0]["message"] == "round 3 done" and lines[0]["level"] == "INFO"
    assert lines[1]["logger"] == "meshfed.test" and "ValueError: boom" in lines[1]["exception"]
    assert "tag" not in lines[0]
    # a tag tells apart processes sharing one stderr (run_client.py --local-clients), in both formats
    setup_logging("INFO", str(log_file), "json", tag="c-1")
    logging.getLogger("meshfed.test").info("tagged")
    assert json.loads(log_file.read_text().splitlines()[-1])["tag"] == "c-1"
    setup_logging("INFO", str(tmp_path / "log.txt"), tag="c-1")
    logging.getLogger("meshfed.test").info("tagged")
    assert " [c-1] meshfed.test: tagged" in (tmp_path / "log.txt").read_text()
    setup_logging("WARNING")


def test_a_server_started_with_json_logs_writes_only_json(tmp_path):
    """run_server.py --log-format json (development server): the banner, werkzeug's and our lines are
    all JSON objects; the banner names the dashboard URL with the admin token."""
    from run_demo import free_port
    port = free_port()
    out = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent.parent / "run_server.py"),
                               "--port", str(port), "--state-dir", str(tmp_path / "state"), "--dataset", "synthetic",
                               "--model", "mlp", "--admin-token", "tok", "--log-format", "json", "--log-level", "debug"],
                              stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        assert requests.post(f"http://127.0.0.1:{port}/api/stop", timeout=5).status_code == 401
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        out.close()
    lines = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines() if line.strip()]
    assert lines[0]["dashboard"] == f"http://127.0.0.1:{port}/?token=tok"
    assert any(e.get("logger") == "werkzeug" and "POST /api/stop" in e["message"] for e in lines)  # request log
