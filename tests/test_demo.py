"""run_demo.py end to end: report.json + PNG, and no process left behind (also after Ctrl-C)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT
from shared.cluster import wait_until


def processes_in(workdir):
    """Processes whose working directory is workdir: the demo starts its server and clients there."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.cwd() == str(workdir):
                found.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def demo(tmp_path, *args, work_dir=True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)}  # its temp work dir goes there
    return subprocess.Popen([sys.executable, str(ROOT / "run_demo.py"), "--dataset", "synthetic", "--port", "0",
                             "--num-clients", "2", "--max-samples", "400", "--eval-limit", "500",
                             "--report-dir", str(tmp_path / "report"),
                             *(["--work-dir", str(tmp_path / "work")] if work_dir else []), *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_demo_writes_report_and_plot_and_stops_everything(tmp_path):
    proc = demo(tmp_path, "--num-rounds", "2", work_dir=False)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    work = Path(re.search(r"logs in (\S+)\)", out).group(1))
    assert work.parent == tmp_path and f"removed {work}" in out and not work.exists()  # no leftovers
    assert "dashboard: http://127.0.0.1:" in out
    assert "round   1/2" in out and "round   2/2" in out
    assert "  round 1: " in out  # a progress line while round 1 runs
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["dataset"] == "synthetic" and report["num_clients"] == 2
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert set(report["rounds"][0]) == {"round", "accuracy", "loss", "num_clients", "num_selected", "seconds"}
    assert report["settings"]["num_rounds"] == 2 and report["run_id"] and report["started"] <= report["finished"]
    assert all(len(repr(r["seconds"]).split(".")[1]) <= 3 for r in report["rounds"])
    assert (tmp_path / "report" / "accuracy_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert processes_in(work) == []


def test_ctrl_c_stops_every_process_the_demo_started(tmp_path):
    proc = demo(tmp_path, "--num-rounds", "50")
    try:
        wait_until(lambda: len(processes_in(tmp_path / "work")) >= 4, 120, "the demo's four processes", every=0.5)
        assert len(processes_in(tmp_path / "work")) == 4  # server, the clients' launcher, 2 forked clients
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    wait_until(lambda: processes_in(tmp_path / "work") == [], 10, "every process of the demo to end")


def test_a_demo_killed_with_sigkill_takes_every_process_with_it(tmp_path):
    proc = demo(tmp_path, "--num-rounds", "50")
    try:
        wait_until(lambda: len(processes_in(tmp_path / "work")) >= 4, 120, "the demo's four processes", every=0.5)
        started = processes_in(tmp_path / "work")
        proc.kill()  # no handler runs: the kernel tells its children (PR_SET_PDEATHSIG), and theirs
        proc.wait(timeout=10)
    finally:
        proc.kill()
    wait_until(lambda: processes_in(tmp_path / "work") == [], 15, f"the demo's processes {started} to end")


def test_the_demo_expresses_a_papers_setting(tmp_path):
    """McMahan et al.'s knobs reach the server and the clients: the 2NN, C, E, B, momentum, seed, no holdout."""
    proc = demo(tmp_path, "--num-clients", "3", "--num-rounds", "2", "--model", "mlp", "--fraction-fit", "0.34",
                "--min-available", "3", "--local-epochs", "2", "--batch-size", "10", "--momentum", "0.5",
                "--seed", "3", "--holdout", "0", "--partition", "iid")
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    settings = report["settings"]
    assert (settings["model"], settings["fraction_fit"], settings["min_available_clients"], settings["local_epochs"],
            settings["batch_size"], settings["momentum"], settings["seed"]) == ("mlp", 0.34, 3, 2, 10, 0.5, 3)
    assert [r["num_selected"] for r in report["rounds"]] == [2, 2]  # ceil(0.34 x 3) of the 3 it waited for
    assert sorted(report["train_examples"].values()) == [400, 400, 400]  # --max-samples 400, none held out


@pytest.mark.parametrize("args,says", [(["--num-clients", "0"], "--num-clients must be at least 1"),
                                       (["--num-rounds", "-1"], "--num-rounds must be at least 1"),
                                       (["--dataset", "nosuch"], "--dataset: invalid choice: 'nosuch'"),
                                       (["--lr", "0"], "--lr must be above 0"),
                                       (["--fraction-fit", "1.5"], "--fraction-fit must be above 0 and at most 1"),
                                       (["--holdout", "1"], "--holdout must be from 0 to below 1")])
def test_a_mistaken_flag_gets_one_line_naming_it_and_nothing_starts(tmp_path, args, says):
    r = subprocess.run([sys.executable, str(ROOT / "run_demo.py"), *args, "--report-dir", str(tmp_path / "r")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()


def test_a_missing_dataset_is_one_line_and_a_taken_port_is_replaced(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = demo(tmp_path, "--dataset", "mnist", "--data-dir", str(tmp_path / "empty"), "--port", str(port),
                    work_dir=False)
        try:
            out, _ = proc.communicate(timeout=180)
        finally:
            proc.kill()
    assert f"port {port} is taken (another meshfed, or another program); using" in out, out
    assert proc.returncode == 1 and "Traceback" not in out, out
    (error,) = [line for line in out.splitlines() if line.startswith("error:")]
    assert "dataset 'mnist' not found offline" in error and "--data-dir" in error
    work = Path(re.search(r"\(logs in (\S+)\)$", error).group(1))
    assert work.exists() and processes_in(work) == []  # kept, to read; every process stopped


def test_a_partial_rounds_line_says_who_did_not_deliver_and_why():
    import run_demo
    row = {"round": 3, "accuracy": 0.8812, "loss": 0.33, "num_clients": 2, "num_selected": 3, "seconds": 41.2}
    assert run_demo.round_line({**row, "why_dropped": {}}, 5).endswith("41.20s  clients 2/3")
    assert run_demo.round_line({**row, "why_dropped": {"c2": "missed the 300 s deadline", "c1": "disconnected"}},
                               5).endswith("clients 2/3: c2 missed the 300 s deadline, c1 disconnected")
