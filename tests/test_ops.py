"""Operations endpoints: liveness, readiness and JSON logs (the /metrics scrape of a real server is
in test_integration.py)."""
import json
import os
import logging
import signal
import subprocess
import sys
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from app.config import RunConfig, ServerConfig
from shared.log import setup_logging
from shared.cluster import wait_until


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


def _json_server(tmp_path, port: int, log_name: str, **env: str) -> subprocess.Popen:
    out = (tmp_path / log_name).open("w")
    server = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent.parent / "run_server.py"),
                               "--port", str(port), "--state-dir", str(tmp_path / "state"), "--dataset", "synthetic",
                               "--model", "mlp", "--log-format", "json", "--log-level", "debug"],
                              stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                              env={k: v for k, v in os.environ.items() if not k.startswith("MESHFED_")} | env)
    out.close()
    try:
        wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok, 60, "the server")
    except TimeoutError:
        server.kill()
        raise TimeoutError((tmp_path / log_name).read_text()[-2000:]) from None
    return server


def _stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)


def test_tokens_are_made_once_kept_private_and_never_logged(tmp_path):
    """run_server.py --log-format json --log-level debug, no tokens given: every line is JSON; the tokens are
    generated, printed once in the banner, kept 0600 in the state dir and reused after a restart; no log line
    (werkzeug's request log included) carries them; the admin token counts only with the Bearer scheme."""
    from shared.cluster import free_port
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _json_server(tmp_path, port, "first.log")
    try:
        banner = json.loads((tmp_path / "first.log").read_text().splitlines()[0])
        admin, enrollment = banner["admin_token"], banner["enrollment_token"]
        assert banner["dashboard"] == f"{url}/?token={admin}"
        assert requests.get(f"{url}/?token={admin}", timeout=5, allow_redirects=False).status_code == 302
        assert requests.post(f"{url}/api/stop", headers={"Authorization": admin}, timeout=5).status_code == 401
        bearer = {"Authorization": f"Bearer {admin}"}
        assert requests.post(f"{url}/api/stop", headers=bearer, timeout=5).status_code == 409  # no run: accepted
        for path in ("/healthz", "/socket.io/?EIO=4&transport=polling"):  # Flask's and Socket.IO's answers
            assert requests.get(url + path, timeout=5).headers["Server"] == "meshfed"  # no versions
    finally:
        _stop(server)
    stored = tmp_path / "state" / "tokens.json"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert json.loads(stored.read_text()) == {"admin": admin, "enrollment": enrollment}
    lines = [json.loads(line) for line in (tmp_path / "first.log").read_text().splitlines() if line.strip()]
    assert any(e.get("logger") == "werkzeug" and "GET /?token=<redacted>" in e["message"] for e in lines)
    assert not [e for e in lines[1:] if admin in json.dumps(e) or enrollment in json.dumps(e)]

    server = _json_server(tmp_path, port, "second.log")  # restarted on the same state dir
    try:
        assert requests.post(f"{url}/api/stop", headers=bearer, timeout=5).status_code == 409  # the same token
    finally:
        _stop(server)
    text = (tmp_path / "second.log").read_text()
    banner = json.loads(text.splitlines()[0])
    assert "admin_token" not in banner and str(stored) in banner["dashboard"]
    assert admin not in text and enrollment not in text

    server = _json_server(tmp_path, port, "third.log", MESHFED_ADMIN_TOKEN="from-the-environment")
    try:
        given = {"Authorization": "Bearer from-the-environment"}
        assert requests.post(f"{url}/api/stop", headers=given, timeout=5).status_code == 409
    finally:
        _stop(server)
    assert "you gave" in json.loads((tmp_path / "third.log").read_text().splitlines()[0])["dashboard"]
