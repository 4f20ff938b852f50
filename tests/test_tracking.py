"""MLflow tracking (app/tracking.py) with a real server and clients, read back with MLflow's own client."""
from __future__ import annotations

import hashlib
import subprocess
import sys

from mlflow.tracking import MlflowClient

from app.tracking import EXPERIMENT, RUN_TAG
from tests.conftest import ROOT

SYNTHETIC = ["--dataset", "synthetic", "--model", "mlp"]


def test_a_run_is_tracked_in_mlflow_with_params_metrics_per_round_and_the_final_model(cluster):
    cluster.start_server(*SYNTHETIC, "--num-rounds", "3", "--min-clients", "2", "--lr", "0.07", "--eval-limit",
                         "300", "--max-batches", "3", "--mlflow", "--start")
    for i in range(2):
        cluster.start_client(f"c{i}", *SYNTHETIC, "--partition", "iid", "--num-clients", "2", "--client-index",
                             str(i), "--max-samples", "200")
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 180, "three rounds")
    status, rounds = cluster.status(), cluster.rounds()
    store = cluster.workdir / "mlruns"
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)

    def tracked():  # the tracker logs on its own thread: the run's end may be a moment behind the server's
        found = client.search_runs([experiment.experiment_id], f"tags.`{RUN_TAG}` = '{status['run_id']}'")
        return found if found and found[0].info.status == "FINISHED" else None
    (run,) = cluster.wait_until(tracked, 30, "the MLflow run to finish")
    assert run.data.params["lr"] == "0.07" and run.data.params["num_rounds"] == "3"
    assert run.data.params["dataset"] == "synthetic" and run.data.tags["meshfed.stop_reason"] == "max_rounds"
    accuracy = client.get_metric_history(run.info.run_id, "accuracy")
    assert [(m.step, m.value) for m in accuracy] == [(r["round"], r["accuracy"]) for r in rounds]
    for name in ("loss", "round_seconds", "clients_asked", "clients_delivered", "updates_refused", "upload_bytes"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2, 3], name
    assert {m.value for m in client.get_metric_history(run.info.run_id, "clients_delivered")} == {2.0}
    assert "epsilon" not in run.data.metrics  # no DP in this run
    (artifact,) = client.list_artifacts(run.info.run_id, "model")
    local = client.download_artifacts(run.info.run_id, artifact.path, str(cluster.workdir / "downloaded"))
    served = cluster.api("GET", f"/api/model/{run.data.tags['meshfed.model_version']}").content
    assert hashlib.sha256(open(local, "rb").read()).digest() == hashlib.sha256(served).digest()  # the final model


def test_an_unreachable_tracking_server_never_holds_a_round_up(cluster):
    cluster.start_server(*SYNTHETIC, "--num-rounds", "3", "--min-clients", "1", "--eval-limit", "300",
                         "--max-batches", "2", "--mlflow-uri", "http://127.0.0.1:9", "--start")  # nothing listens
    cluster.start_client("c0", *SYNTHETIC, "--partition", "iid", "--num-clients", "1", "--max-samples", "100")
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 120, "three rounds, untracked")
    assert [r["round"] for r in cluster.rounds()] == [1, 2, 3]


def test_mlflow_is_not_imported_unless_asked_and_a_follower_cannot_track():
    r = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "run_server.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and " mlflow" not in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "run_server.py"), "--mlflow", "--role", "follower",
                        "--leader-url", "http://127.0.0.1:1", "--message-queue", "redis://127.0.0.1:1/0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--mlflow" in r.stderr and "leader" in r.stderr and "Traceback" not in r.stderr
