"""The server's evaluation in a child process (evaluation 'process'): the same scores as in-process, progress on
the way, a dead child is an error of that evaluation only, and the child ends with the server."""
from __future__ import annotations

import os
import signal

import psutil
import pytest

from app.evaluator import Evaluator, ProcessEvaluator
from shared.cluster import wait_until


@pytest.fixture
def child():
    evaluator = ProcessEvaluator("synthetic", "mlp", limit=700)
    yield evaluator
    evaluator.close()


def test_the_child_scores_a_model_as_the_server_would_and_reports_progress_on_the_way(child):
    here = Evaluator("synthetic", "mlp", limit=700)
    weights = here.initial_weights(seed=3)
    assert child.input_shape == here.input_shape
    seen: list[tuple[int, int]] = []
    assert child(weights, lambda done, of: seen.append((done, of))) == pytest.approx(here(weights), rel=1e-6)
    assert seen == [(700, 700)]  # one batch of 1,000 holds the 700 samples
    assert child(child.initial_weights(seed=4)) != child(weights)  # it scores what it is sent


def test_a_child_that_died_between_evaluations_is_started_again(child):
    weights = child.initial_weights(seed=0)
    score, first = child(weights), child._child.pid
    os.kill(first, signal.SIGKILL)
    child._child.wait()
    assert child(weights) == score and child._child.pid != first


def test_a_child_that_dies_during_an_evaluation_fails_that_one_with_a_reason(fmnist):
    evaluator = ProcessEvaluator("fashion-mnist", "mlp", limit=3000)  # three batches: it dies after the first
    try:
        weights = evaluator.initial_weights(seed=0)
        kill = lambda done, of: os.kill(evaluator._child.pid, signal.SIGKILL)  # noqa: E731
        with pytest.raises(RuntimeError, match="the evaluation process exited with -9"):
            evaluator(weights, kill)
        loss, accuracy = evaluator(weights)  # a new child
        assert (loss, accuracy) == pytest.approx(Evaluator("fashion-mnist", "mlp", limit=3000)(weights), rel=1e-6)
    finally:
        evaluator.close()


def test_a_child_that_cannot_load_the_split_says_why(tmp_path):
    evaluator = ProcessEvaluator("mnist", "cnn", data_dir=str(tmp_path), limit=10)  # none here, nor in CI
    try:
        with pytest.raises(RuntimeError, match="the evaluation process failed: DatasetNotFound: .*mnist"):
            evaluator.input_shape
    finally:
        evaluator.close()


def test_a_process_evaluation_run_with_real_processes_and_its_child_ends_with_a_killed_server(cluster):
    synthetic = ["--dataset", "synthetic", "--model", "mlp"]
    cluster.start_server(*synthetic, "--num-rounds", "2", "--min-clients", "2", "--eval-limit", "300",
                         "--max-batches", "3", "--evaluation", "process", "--start")
    for i in range(2):
        cluster.start_client(f"c{i}", *synthetic, "--partition", "iid", "--num-clients", "2", "--client-index",
                             str(i), "--max-samples", "200")
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 120, "two rounds")
    rounds = cluster.rounds()
    assert [r["round"] for r in rounds] == [1, 2] and all(0 <= r["accuracy"] <= 1 for r in rounds)
    assert cluster.status()["config"]["evaluation"] == "process"
    children = [p for p in psutil.Process(cluster.server.pid).children() if "app.evaluator" in p.cmdline()]
    assert len(children) == 1  # one child for the run's dataset and model, started once
    assert "evaluation process %d started" % children[0].pid in (cluster.workdir / "server.log").read_text()
    cluster.kill(cluster.server)
    wait_until(lambda: not children[0].is_running() or children[0].status() == psutil.STATUS_ZOMBIE, 10,
               "the evaluation process to end with the server (it reads the end of its pipe)")


def test_an_evaluation_logs_its_progress_at_most_every_few_seconds(caplog, monkeypatch):
    from app import evaluation
    progress = evaluation.progress_log("round 3: evaluating")
    with caplog.at_level("INFO", logger="meshfed.evaluation"):
        progress(1000, 3000)  # within PROGRESS_EVERY of the start: a short evaluation says nothing
        monkeypatch.setattr(evaluation, "PROGRESS_EVERY", 0.0)
        progress(2000, 3000)
        progress(3000, 3000)  # done: the round's own line follows
    assert [r.getMessage() for r in caplog.records] == ["round 3: evaluating: 2000/3000 test samples"]
