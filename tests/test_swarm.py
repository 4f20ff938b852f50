"""The load generator (bench/swarm.py) in its CI size: 200 protocol-level clients with their own RSA keys hold
websockets to a real server, download the model and post signed updates for two rounds, and nothing is lost."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_two_hundred_simulated_clients_two_rounds_and_nothing_lost(tmp_path):
    out = tmp_path / "swarm.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "swarm.py"), "--clients", "200", "--processes", "2",
                           "--rounds", "2", "--key-dir", str(tmp_path / "keys"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(r["round"], r["asked"], r["delivered"], r["accepted"]) for r in report["rounds"]] == \
        [(1, 200, 200, 200), (2, 200, 200, 200)]
    assert (report["lost"], report["refused"], report["failed"]) == (0, 0, 0)
    assert report["reconnects"] == 0 and report["disconnects"] == 0  # nobody flapped
    assert report["healthz_failures"] == 0 and report["healthz_samples"] > 0
    assert report["server_peak"]["threads"] > 200 and report["server_cpu_ms_per_accepted_update"] > 0
    assert "clients online 200/200" in done.stderr
    mass = report["mass_disconnect"]  # then all 200 vanish at once: the server counts them gone and answers
    assert mass["server_processes_unchanged"] and mass["answers_after"] and mass["clients_gone_in_s"] < 60
