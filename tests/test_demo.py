"""run_demo.py end to end: report.json + PNG, and no process left behind (also after Ctrl-C)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil

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


def demo(tmp_path, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "run_demo.py"), "--dataset", "synthetic", "--port", "0",
                             "--num-clients", "2", "--max-samples", "400", "--eval-limit", "500",
                             "--report-dir", str(tmp_path / "report"), "--work-dir", str(tmp_path / "work"), *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_demo_writes_report_and_plot_and_stops_everything(tmp_path):
    proc = demo(tmp_path, "--num-rounds", "2")
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "dashboard: http://127.0.0.1:" in out
    assert "round   1/2" in out and "round   2/2" in out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["dataset"] == "synthetic" and report["num_clients"] == 2
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert set(report["rounds"][0]) == {"round", "accuracy", "loss", "num_clients", "seconds"}
    assert (tmp_path / "report" / "accuracy_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert processes_in(tmp_path / "work") == []


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
