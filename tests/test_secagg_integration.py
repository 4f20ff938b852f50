"""Secure aggregation with a real server and real client processes: the sum the server unmasks is the plain sum
of the clients' quantised inputs, bit for bit, and the new model is exactly that sum applied; what the server
held of each client was masked; three of ten clients SIGKILLed between sharing keys and sending input are
recovered; below the threshold the round is played again, never aggregated.

Clients and server write what they hold to $MESHFED_SECAGG_AUDIT_DIR (shared/secagg.audit), which is how the
tests see the plaintext inputs that never leave a client."""
from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
from scipy import stats

from shared import secagg
from shared.protocol import decode_weights

FMNIST_MLP = ["--dataset", "fashion-mnist", "--model", "mlp"]
SECURE = ["--secure-aggregation", "secagg+", "--eval-limit", "300", "--max-batches", "3", "--round-timeout", "90"]


def _audit(folder: Path, run_id: str, round_no: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                                              np.ndarray]:
    """(client -> plaintext input, client -> what the server held of it, the unmasked sum) of one round."""
    def load(kind: str) -> dict[str, np.ndarray]:
        prefix = f"{run_id}-{round_no}-"
        return {p.name[len(prefix):-len(f".{kind}.npy")]: np.load(p, allow_pickle=False)
                for p in folder.glob(f"{prefix}*.{kind}.npy")}
    return load("input"), load("masked"), np.load(folder / f"{run_id}-{round_no}.sum.npy", allow_pickle=False)


def _ring_sum(arrays: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(arrays[0])
    for a in arrays:
        total += a  # uint32: modulo 2^32
    return total


def test_a_secure_run_unmasks_exactly_the_plain_sum_and_the_server_holds_only_masked_inputs(
        cluster, fmnist, tmp_path, monkeypatch):
    audit = tmp_path / "audit"
    monkeypatch.setenv(secagg.AUDIT_ENV, str(audit))
    cluster.start_server(*FMNIST_MLP, *SECURE, "--num-rounds", "2", "--min-clients", "4", "--start")
    cluster.start_clients("c", 4, *FMNIST_MLP, "--partition", "iid", "--num-clients", "4", "--max-samples", "300")
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 240, "two secure rounds")
    run_id, rounds = cluster.status()["run_id"], cluster.rounds()
    assert [r["round"] for r in rounds] == [1, 2]
    models = {v["version"]: v for v in cluster.api("GET", "/api/models").json()["versions"]}
    for r in rounds:
        s = r["secure"]
        assert (s["advertised"], s["shared"], s["survivors"], s["recovered"]) == (4, 4, 4, 0), s
        assert set(s["seconds"]) == {"keys", "shares", "inputs", "reveal", "unmask"}
        assert s["bytes"]["keys_received"] > 0 and s["bytes"]["shares_sent"] > 0
        inputs, masked, unmasked = _audit(audit, run_id, r["round"])
        assert set(inputs) == set(masked) == set(r["clients"]) == {"c-0", "c-1", "c-2", "c-3"}
        assert np.array_equal(_ring_sum(list(inputs.values())), unmasked)  # bit for bit
        for cid in inputs:  # each held input is masked: unlike its plaintext, uniform on the ring
            assert np.mean(masked[cid] == inputs[cid]) < 0.01
            assert stats.kstest(masked[cid] / 2**32, "uniform").pvalue > 1e-4
            assert stats.kstest(inputs[cid] / 2**32, "uniform").pvalue < 1e-10
        # the new model is the old one plus the unmasked sum, dequantised (FedAvg, every client survived)
        before, after = (decode_weights(cluster.api("GET", f"/api/model/{v}").content)
                         for v in (r["model_version"] - 1, r["model_version"]))
        names = sorted(before)
        step = np.concatenate([(after[n] - before[n]).reshape(-1) for n in names])
        mean = unmasked.view(np.int32).astype(np.float64) / secagg.ring_scale(1.0, 4)
        np.testing.assert_allclose(step, mean, atol=2e-7)
        assert models[r["model_version"]]["source"] == "round"
    assert rounds[-1]["accuracy"] > 0.5
    metrics = cluster.api("GET", "/metrics").text
    assert "meshfed_secure_rounds_total 2.0" in metrics


def _start_doomed(cluster, ids: list[str], total: int) -> dict[str, object]:
    """Clients that share their keys and then take 300 s to send input: killed before they do."""
    return {cid: cluster.start_client(cid, *FMNIST_MLP, "--partition", "iid", "--num-clients", str(total),
                                      "--client-index", str(total - len(ids) + i), "--max-samples", "300",
                                      "--delay", "300")
            for i, cid in enumerate(ids)}


def _kill_after_sharing(cluster, doomed: dict[str, object], shared: int, delivered: int) -> None:
    def inputs_stage() -> bool:
        s = cluster.status()
        return (s["secure_round"] or {}).get("stage") == "inputs" and s["secure_round"]["shared"] == shared and \
            len((s["open_round"] or {}).get("delivered", [])) == delivered
    cluster.wait_until(inputs_stage, 180, f"{shared} clients to share keys and {delivered} to send input")
    for proc in doomed.values():
        cluster.kill(proc, signal.SIGKILL)


def test_three_of_ten_clients_killed_after_sharing_keys_are_recovered(cluster, fmnist, tmp_path, monkeypatch):
    audit = tmp_path / "audit"
    monkeypatch.setenv(secagg.AUDIT_ENV, str(audit))
    cluster.start_server(*FMNIST_MLP, *SECURE, "--num-rounds", "1", "--min-clients", "10", "--start")
    cluster.start_clients("s", 7, *FMNIST_MLP, "--partition", "iid", "--num-clients", "10", "--max-samples", "300")
    doomed = _start_doomed(cluster, ["d-7", "d-8", "d-9"], 10)
    _kill_after_sharing(cluster, doomed, shared=10, delivered=7)
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 120, "the round to finish without them")
    (row,) = cluster.rounds()
    s = row["secure"]
    assert (s["advertised"], s["shared"], s["survivors"], s["recovered"]) == (10, 10, 7, 3), s
    assert s["dropped"] == ["d-7", "d-8", "d-9"] and row["clients"] == [f"s-{i}" for i in range(7)]
    inputs, masked, unmasked = _audit(audit, cluster.status()["run_id"], 1)
    assert set(inputs) == set(masked) == set(row["clients"])
    assert np.array_equal(_ring_sum(list(inputs.values())), unmasked)  # their pairwise masks removed exactly
    assert "meshfed_secure_dropouts_recovered_total 3.0" in cluster.api("GET", "/metrics").text


def test_below_the_threshold_the_round_is_played_again_not_aggregated(cluster, fmnist):
    cluster.start_server(*FMNIST_MLP, *SECURE, "--num-rounds", "1", "--min-clients", "2", "--quorum", "0.2")
    cluster.start_clients("s", 2, *FMNIST_MLP, "--partition", "iid", "--num-clients", "5", "--max-samples", "300")
    doomed = _start_doomed(cluster, ["d-2", "d-3", "d-4"], 5)
    cluster.wait_until(lambda: cluster.status()["clients_online"] == 5, 120, "five clients online")
    assert cluster.api("POST", "/api/start", admin=True).ok
    initial = cluster.status()["model_version"]  # the run's initial model
    _kill_after_sharing(cluster, doomed, shared=5, delivered=2)  # 2 survive of 5; the threshold is 3
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 120, "the round, played again by two")
    (row,) = cluster.rounds()
    assert row["clients"] == ["s-0", "s-1"] and row["secure"]["advertised"] == 2
    log = (cluster.workdir / "server.log").read_text()
    assert "secure aggregation abandoned the round: 3 of 5 clients dropped after sharing keys" in log
    assert "meshfed_secure_rounds_abandoned_total 1.0" in cluster.api("GET", "/metrics").text
    versions = [v["version"] for v in cluster.api("GET", "/api/models").json()["versions"]]
    assert row["model_version"] == max(versions) == initial + 1  # nothing was committed from the abandoned try
