"""Operations endpoints: liveness, readiness and JSON logs (the /metrics scrape of a real server is
in test_integration.py)."""
import json
import logging

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
    setup_logging("WARNING")
