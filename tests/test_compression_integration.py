"""Top-k uploads with error feedback and delta-coded downloads between real processes (issue 24)."""
from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families
from safetensors import safe_open

from shared.compression import DOWNLINK, apply_step, inflate, topk_count
from shared.protocol import decode_weights, encode_weights, sha256_hex

FMNIST_MLP = ["--dataset", "fashion-mnist", "--model", "mlp"]


def test_topk_int8_uploads_and_delta_coded_downloads_between_real_processes(cluster, fmnist):
    cluster.start_server(*FMNIST_MLP, "--num-rounds", "3", "--min-clients", "2", "--eval-limit", "1000",
                         "--compression", "topk+int8", "--topk-ratio", "0.01", "--download-compression", "int8",
                         "--start")
    cluster.start_clients("c", 2, *FMNIST_MLP, "--partition", "iid", "--num-clients", "2", "--max-samples", "1000")
    cluster.wait_until(lambda: cluster.status()["state"] == "finished", 240, "three rounds")
    rounds = cluster.rounds()
    assert [r["round"] for r in rounds] == [1, 2, 3] and all(r["clients"] == ["c-0", "c-1"] for r in rounds)
    # the 2NN's 199,210 values: 1% of each, at least MIN_SENT, and whole when that is half of it: 10,602 values
    sent = sum(topk_count(math.prod(shape), 0.01) for shape in ((200, 784), (200,), (200, 200), (200,), (10, 200),
                                                                 (10,)))
    assert sent == 10_602
    for r in rounds:
        t = r["timings"]
        assert t["upload_bytes"] / t["uploads"] < 2.5 * sent + 2048, t  # an int8 value, a 1-2 byte gap, a header
        delta = r["round"] > 1  # round 1's model is the run's first: nobody holds an earlier one
        assert t["delta_downloads"] == (2 if delta else 0), t
        assert (t["download_bytes"] / t["downloads"] < t["model_bytes"] / 4) == delta, t
    assert rounds[-1]["accuracy"] > 0.5, rounds  # it learns (10 classes: 0.1 by chance)

    # The committed model is exactly the last one plus the coded step the server hands out
    v = rounds[-1]["model_version"]
    before = cluster.api("GET", f"/api/model/{v - 1}").content
    step = cluster.api("GET", f"/api/model/{v}/delta?from={v - 1}")
    assert step.ok and len(step.content) < len(before) / 4
    rebuilt = encode_weights(apply_step(decode_weights(before), decode_weights(inflate(step.content, 1 << 24)),
                                        DOWNLINK))
    whole = cluster.api("GET", f"/api/model/{v}").content
    assert sha256_hex(rebuilt) == step.headers["X-Model-SHA256"] == sha256_hex(whole)
    assert cluster.api("GET", f"/api/model/{v}/delta?from={v - 3}").status_code == 404  # no such step: the whole model

    metrics = {m.name: m for m in text_string_to_metric_families(cluster.api("GET", "/metrics").text)}
    sent = {s.labels["kind"]: s.value for s in metrics["meshfed_model_download_bytes"].samples}
    assert sent["delta"] > 0 and sent["full"] > 0
    ratio = {s.labels["direction"]: s.value for s in metrics["meshfed_compression_ratio"].samples}
    assert ratio["upload"] > 30 and ratio["download"] > 4, ratio  # 797,432 float32 bytes over about 22 KB

    run_id = cluster.status()["run_id"]  # each client's error-feedback residual, kept with its key, for this run
    for cid in ("c-0", "c-1"):
        with safe_open(str(cluster.workdir / "keys" / f"{cid}.residual.safetensors"), framework="np") as f:
            assert f.metadata()["run_id"] == run_id and f.get_tensor("net.1.weight").any()
