"""Differential privacy with real server and client processes: DP-SGD through Opacus stops at its budget with
no client past it; client-level DP's accountant survives a SIGKILL of the server and goes on counting."""
from __future__ import annotations

import signal

import pytest

from shared.privacy import Accountant

FMNIST_MLP = ["--dataset", "fashion-mnist", "--model", "mlp"]


def test_dp_sgd_runs_until_the_budget_and_no_client_passes_it(cluster, fmnist):
    cluster.start_server(*FMNIST_MLP, "--num-rounds", "10", "--min-clients", "2", "--dp", "sample",
                         "--target-epsilon", "5", "--noise-multiplier", "1.0", "--max-grad-norm", "1.0",
                         "--batch-size", "60", "--lr", "0.1", "--eval-limit", "1000", "--round-timeout", "60",
                         "--start")
    cluster.start_clients("c", 2, *FMNIST_MLP, "--partition", "iid", "--num-clients", "2", "--max-samples", "600")
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 300, "the run to spend its budget")
    run = cluster.api("GET", "/api/privacy").json()
    rounds = cluster.rounds()
    # 480 training examples each, batches of ~60: q = 1/8, 8 steps a round; epsilon 3.79, 4.70, then 5.41 > 5
    assert [r["round"] for r in rounds] == [1, 2], rounds
    assert {r["clients"] == ["c-0", "c-1"] for r in rounds} == {True}
    assert run["mode"] == "sample" and set(run["clients"]) == {"c-0", "c-1"}
    for points in run["clients"].values():
        epsilons = [p["epsilon"] for p in points]
        assert epsilons == sorted(epsilons) and epsilons[-1] <= 5.0
        assert epsilons[-1] == pytest.approx(Accountant("rdp", [[1.0, 0.125, 8]] * 2).epsilon(1e-5), rel=1e-6)
    stop = cluster.api("GET", "/api/status").json()
    assert stop["state"] == "finished"
    log = (cluster.workdir / "c.log").read_text()
    assert "past the run's budget of 5" in log  # each client refused round 3 itself
    server_log = (cluster.workdir / "server.log").read_text()
    assert "finished: privacy budget" in server_log
    metrics = cluster.api("GET", "/metrics").text
    assert 'meshfed_privacy_epsilon{scope="client:c-0"}' in metrics


def test_client_level_dp_accounting_survives_a_sigkill_and_goes_on(cluster, fmnist):
    args = [*FMNIST_MLP, "--num-rounds", "4", "--min-clients", "3", "--dp", "client", "--noise-multiplier", "1.0",
            "--clip-norm", "0.5", "--clip-quantile", "0.5", "--eval-limit", "500", "--max-batches", "5"]
    cluster.start_server(*args, "--start")
    cluster.start_clients("c", 3, *FMNIST_MLP, "--partition", "iid", "--num-clients", "3", "--max-samples", "300")
    cluster.wait_until(lambda: len(cluster.rounds()) >= 2, 180, "two client-level DP rounds")
    before = cluster.api("GET", "/api/privacy").json()["run"]
    cluster.kill(cluster.server, signal.SIGKILL)
    cluster.start_server(*args)  # resumes the run, and its accountant
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 240, "the resumed run")
    run = cluster.api("GET", "/api/privacy").json()["run"]
    assert [p["round"] for p in run] == [1, 2, 3, 4]
    assert [p["epsilon"] for p in run[:len(before)]] == [p["epsilon"] for p in before]
    epsilons = [p["epsilon"] for p in run]
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == 4  # it went on counting, it did not restart
    # q = 3 asked / 3 registered = 1, one step a round: the fourth epsilon is four such steps
    assert epsilons[-1] == pytest.approx(Accountant("rdp", [[1.0, 1.0, 1]] * 4).epsilon(1e-5), rel=1e-6)
    clips = [p["clip"] for p in run]
    assert clips[0] == 0.5 and len(set(clips)) > 1  # the clip adapted, and carried over the restart
