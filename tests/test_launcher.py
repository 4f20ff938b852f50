"""run_client.py --local-clients: N real client processes forked by one launcher."""
from __future__ import annotations

import signal

import psutil
import pytest

import run_client
from shared.cluster import wait_until


def test_each_local_client_gets_its_own_id_partition_log_file_and_mesh_port():
    args = run_client.parse_args(["--client-id", "edge", "--num-clients", "10", "--client-index", "4",
                                  "--local-clients", "3", "--log-file", "logs/client.log", "--mesh-port", "7000"])
    children = [run_client.local_client_args(args, k) for k in range(3)]
    assert [c.client_id for c in children] == ["edge-0", "edge-1", "edge-2"]
    assert [c.log_tag for c in children] == ["edge-0", "edge-1", "edge-2"]
    assert [c.client_index for c in children] == [4, 5, 6]
    assert [c.log_file for c in children] == ["logs/client-0.log", "logs/client-1.log", "logs/client-2.log"]
    assert [c.mesh_port for c in children] == [7000, 7001, 7002]
    assert {c.local_clients for c in children} == {1} and args.client_id == "edge"  # the launcher's own unchanged

    derived = run_client.parse_args(["--client-id", "edge", "--num-clients", "10", "--client-index", "-1"])
    assert run_client.local_client_args(derived, 2).client_index == -1  # each derives its own from its id
    too_many = run_client.parse_args(["--num-clients", "4", "--client-index", "2", "--local-clients", "3"])
    with pytest.raises(SystemExit, match="exceeds --num-clients 4"):
        run_client.local_client_args(too_many, 2)


def test_the_launcher_refuses_bad_flags_before_forking_anything(monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit):
        run_client.parse_args(["--local-clients", "0"])
    assert "--local-clients must be at least 1" in capsys.readouterr().err
    monkeypatch.delenv("MESHFED_ENROLLMENT_TOKEN", raising=False)
    before = psutil.Process().children()
    with pytest.raises(SystemExit, match="pass --enrollment-token"):
        run_client.main(["--local-clients", "3"])
    raw = tmp_path / "MNIST" / "raw"  # unreadable data: refused once, by the launcher, before forking
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"not idx")
    with pytest.raises(SystemExit, match="train-images-idx3-ubyte is not an unsigned-byte idx file"):
        run_client.main(["--local-clients", "3", "--num-clients", "3", "--enrollment-token", "t",
                         "--dataset", "mnist", "--data-dir", str(tmp_path)])
    assert psutil.Process().children() == before


def gone(pids, timeout):
    """Wait until none of pids runs (zombies count as gone); return those still running."""
    def alive():
        return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    try:
        wait_until(lambda: not alive(), timeout, f"processes {pids} to end")
    except TimeoutError:
        return alive()
    return []


def test_forked_clients_train_separately_and_die_with_their_launcher(cluster, fmnist):
    cluster.start_server("--dataset", "fashion-mnist", "--num-rounds", "20", "--min-clients", "2",
                         "--max-batches", "1", "--eval-limit", "500", "--round-timeout", "60", "--start")
    launcher = cluster.start_clients("c", 3, "--dataset", "fashion-mnist", "--partition", "iid",
                                     "--max-samples", "320", "--num-clients", "3", "--client-index", "0")
    rounds = cluster.wait_until(lambda: [r for r in cluster.rounds() if r["num_clients"] == 3], 240,
                                "a round with all three forked clients")
    assert rounds[0]["clients"] == ["c-0", "c-1", "c-2"]
    registered = {c["id"]: c for c in cluster.api("GET", "/api/clients").json()["clients"]}
    assert len({c["fingerprint"] for c in registered.values()}) == 3  # a key each
    children = psutil.Process(launcher.pid).children()
    assert len(children) == 3 and launcher.pid not in {c.pid for c in children}
    log = (cluster.workdir / "c.log").read_text()
    assert all(f"[c-{k}] meshfed.client: registered as c-{k}" in log for k in range(3)), log[-2000:]

    # One of them killed: the launcher and the other two carry on.
    children[0].send_signal(signal.SIGKILL)
    assert gone([children[0].pid], 30) == []
    after = len(cluster.rounds())
    cluster.wait_until(lambda: [r for r in cluster.rounds()[after:] if r["num_clients"] == 2], 120,
                       "a round with the two survivors")
    assert launcher.poll() is None and all(c.is_running() for c in children[1:])

    # The launcher killed outright: its clients follow it (PR_SET_PDEATHSIG), none is left behind.
    cluster.kill(launcher, signal.SIGKILL)
    assert gone([c.pid for c in children[1:]], 60) == []
