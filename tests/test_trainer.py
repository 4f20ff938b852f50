import numpy as np

from client.trainer import DataConfig, LocalTrainer
from shared.datasets import load_split


def test_client_keeps_only_its_partition_and_can_repartition():
    t = LocalTrainer(DataConfig(dataset="synthetic", partition="iid", num_clients=4, client_index=1), "mlp")
    assert t.num_examples == 1200 and len(t.y_hold) == 300  # 6000 / 4, 80/20
    assert len(np.unique(t.y.numpy())) == 10
    assert t.repartition("iid", 0.5) is False
    assert t.repartition("shards", 0.5) is True
    labels = np.unique(np.concatenate([t.y.numpy(), t.y_hold.numpy()]))
    assert len(labels) <= 4  # each of two label-sorted shards spans at most 2 classes


def test_fit_returns_a_delta_that_improves_held_out_accuracy():
    t = LocalTrainer(DataConfig(dataset="synthetic", partition="iid", num_clients=2, client_index=0), "mlp")
    from shared.models import get_weights
    start = get_weights(t.model)
    before = t.evaluate(start)[1]
    delta, metrics = t.fit(start, epochs=1, lr=0.05, batch_size=32)
    after = t.evaluate({k: start[k] + delta[k] for k in start})[1]
    assert list(delta) == list(start) and after > before + 0.3 and metrics["batches"] > 0
    assert any(np.abs(d).sum() > 0 for d in delta.values())
    assert load_split("synthetic", train=True).labels.shape == (6000,)
