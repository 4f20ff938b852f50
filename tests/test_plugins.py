"""Plug-ins (a strategy, a model, a dataset) with real processes, and what importing each API loads."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

PLUGINS = "tests.example_plugins"


def test_a_run_with_a_plugin_strategy_model_and_dataset_learns(cluster):
    cluster.start_server("--strategy-module", PLUGINS, "--model-module", PLUGINS, "--dataset-module", PLUGINS,
                         "--strategy", "geomed_lite", "--model", "logreg", "--dataset", "stripes", "--num-rounds", "3",
                         "--min-clients", "3", "--lr", "0.5", "--start")
    cluster.start_clients("c", 3, "--model-module", PLUGINS, "--dataset-module", PLUGINS, "--model", "logreg",
                          "--dataset", "stripes", "--partition", "iid", "--num-clients", "3")
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 180, "3 rounds with plug-ins")
    rounds = cluster.rounds()
    assert [r["num_clients"] for r in rounds] == [3, 3, 3]
    assert rounds[-1]["accuracy"] > 0.5, rounds  # chance is 1/8
    schema = cluster.api("GET", "/api/config/schema").json()["properties"]
    assert "geomed_lite" in schema["strategy"]["enum"] and "logreg" in schema["model"]["enum"]
    assert "stripes" in schema["dataset"]["enum"]  # the dashboard's form offers them


def loaded_by(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_strategy_plugin_api_loads_neither_flask_nor_torch():
    modules = loaded_by("from app.strategy import register")
    assert not {m for m in modules if m.split(".")[0] in ("flask", "torch", "flask_socketio")}


def test_a_client_without_the_mesh_loads_neither_zeroconf_nor_qrcode():
    modules = loaded_by("import client.node, run_client")
    assert "torch" in modules and not {m for m in modules if m.split(".")[0] in ("zeroconf", "qrcode")}
