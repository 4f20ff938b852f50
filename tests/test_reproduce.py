"""bench/reproduce.py end to end: a paper's preset, shrunk to two rounds, on MNIST-format files written here."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tests.conftest import ROOT
from tests.test_datasets import write_idx


def write_learnable_mnist(root):
    """MNIST's layout and record counts (60,000 + 10,000), with a learnable image per label that is sparse like a
    digit: a template of 15% lit pixels, each image losing a tenth of them and gaining 2% stray ones."""
    templates = (np.random.default_rng(0).random((10, 28, 28)) < 0.15) * 255
    for prefix, n, seed in (("train", 60000, 1), ("t10k", 10000, 2)):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 10, n)
        kept, stray = rng.random((n, 28, 28)) < 0.9, rng.random((n, 28, 28)) < 0.02
        images = np.where(stray, 255, templates[labels] * kept).astype(np.uint8)
        write_idx(root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", labels)


def test_the_mcmahan_preset_runs_two_rounds_and_reports_beside_the_paper(tmp_path):
    write_learnable_mnist(tmp_path / "data")
    out = tmp_path / "out" / "mcmahan.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "reproduce.py"), "--preset", "mcmahan-cnn-iid-e1-b10",
                        "--data-dir", str(tmp_path / "data"), "--num-clients", "4", "--num-rounds", "2",
                        "--max-samples", "200", "--eval-limit", "1000", "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "clients online 4/4" in r.stderr  # progress while the clients come online
    report = json.loads(out.read_text())
    assert report["preset"]["paper_rounds"] == 34 and report["preset"]["target"] == 0.99
    assert (report["preset"]["local_epochs"], report["preset"]["batch_size"], report["preset"]["fraction_fit"]) == \
        (1, 10, 0.1)
    assert report["changed"] == ["num_clients 4", "num_rounds 2", "max_samples 200", "eval_limit 1000"]
    assert [(x["round"], x["asked"], x["clients"]) for x in report["rounds"]] == [(1, 1, 1), (2, 1, 1)]  # C x 4 -> 1
    assert report["rounds"][-1]["accuracy"] > 0.5  # the templates are learnable: the CNN trained on real files
    assert report["rounds_to_target"] is None or report["rounds_to_target"] <= 2
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [x["round"] for x in lines[:2]] == [1, 2] and lines[-1]["name"] == "mcmahan-cnn-iid-e1-b10"


def test_the_presets_are_listed_with_what_their_papers_say():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "reproduce.py"), "--list"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "mcmahan-cnn-iid-e1-b10" in r.stdout and "the paper: 34 rounds to 99.0%" in r.stdout
    assert "niid-bench-fmnist-dir0.5" in r.stdout
