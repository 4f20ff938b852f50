import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from client import trainer as trainer_module
from client.trainer import DataConfig, LocalTrainer, preload_split
from shared.datasets import load_split


def test_client_keeps_only_its_partition_and_can_repartition():
    t = LocalTrainer(DataConfig(dataset="synthetic", partition="iid", num_clients=4, client_index=1), "mlp")
    assert t.num_examples == 1200 and len(t.y_hold) == 300  # 6000 / 4, 80/20
    assert len(np.unique(t.y.numpy())) == 10
    assert t.repartition("iid", 0.5) is False
    assert t.repartition("shards", 0.5) is True
    labels = np.unique(np.concatenate([t.y.numpy(), t.y_hold.numpy()]))
    assert len(labels) <= 4  # each of two label-sorted shards spans at most 2 classes


def test_a_preloaded_split_is_taken_once_and_gives_the_same_partition(monkeypatch):
    config = DataConfig(dataset="synthetic", partition="dirichlet", num_clients=4, client_index=2)
    decoded = []
    monkeypatch.setattr(trainer_module, "load_split", lambda *a, **k: decoded.append(a) or load_split(*a, **k))
    alone = LocalTrainer(config, "mlp")
    preload_split("synthetic", None)            # what a launcher does before forking its clients
    assert len(decoded) == 2
    forked = LocalTrainer(config, "mlp")        # takes the preloaded split: nothing decoded again
    assert len(decoded) == 2 and trainer_module._preloaded == {}
    assert torch.equal(alone.x, forked.x) and torch.equal(alone.y_hold, forked.y_hold)
    LocalTrainer(config, "mlp")                 # the next one decodes its own
    assert len(decoded) == 3


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


def test_a_model_loaded_for_evaluation_is_trained_from_as_is_and_reloaded_after_training():
    t = LocalTrainer(DataConfig(dataset="synthetic", partition="iid", num_clients=2, client_index=0), "mlp")
    fresh = LocalTrainer(DataConfig(dataset="synthetic", partition="iid", num_clients=2, client_index=0), "mlp")
    from shared.models import build_model, get_weights
    start = get_weights(build_model("mlp", (1, 28, 28), seed=5))
    held_out = t.evaluate(start)                   # loads start
    first, _ = t.fit(start, 1, 0.05, 32, seed=1)   # trains from it without loading it again
    second, _ = t.fit(start, 1, 0.05, 32, seed=1)  # training changed the model: start is loaded again
    expected, _ = fresh.fit(start, 1, 0.05, 32, seed=1)
    for k in start:
        np.testing.assert_array_equal(first[k], expected[k])
        np.testing.assert_array_equal(second[k], expected[k])
    assert t.evaluate(start) == held_out           # and after training, evaluating start reloads it


def test_a_model_evaluated_apart_leaves_the_training_model_alone_and_scores_the_same():
    """The held-out evaluation of an announced model runs on a model of its own, so a round training meanwhile
    (a server evaluating in the background asks for it at once) neither waits for it nor sees its weights."""
    from shared.models import build_model, get_weights
    t = LocalTrainer(DataConfig(dataset="synthetic", partition="iid", num_clients=2, client_index=0), "mlp")
    announced = get_weights(build_model("mlp", (1, 28, 28), seed=5))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    assert t.evaluate_apart(announced) == t.evaluate(announced)
    t.fit(announced, 1, 0.05, 32, seed=1)
    trained = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.evaluate_apart(get_weights(build_model("mlp", (1, 28, 28), seed=6)))
    assert all(torch.equal(trained[k], v) for k, v in t.model.state_dict().items())
    assert not all(torch.equal(before[k], trained[k]) for k in before)


def test_train_makes_torch_optim_sgds_update_without_importing_dynamo():
    """train()'s hand-written step equals torch.optim.SGD's, bit for bit (with FedProx's term and with
    momentum too), and training does not import torch._dynamo (what torch.optim's first use costs a process)."""
    from shared.models import build_model
    from shared.training import train
    x, y = torch.randn(100, 1, 28, 28), torch.randint(0, 10, (100,))
    for mu, momentum in ((0.0, 0.0), (0.1, 0.0), (0.0, 0.9), (0.1, 0.5)):
        ours, reference = build_model("cnn", (1, 28, 28), seed=3), build_model("cnn", (1, 28, 28), seed=3)
        train(ours, x, y, epochs=1, lr=0.05, batch_size=32, seed=7, proximal_mu=mu, momentum=momentum)
        reference.train()
        optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=momentum)
        anchor = [p.detach().clone() for p in reference.parameters()]
        order = torch.randperm(100, generator=torch.Generator().manual_seed(7))
        for start in range(0, 100, 32):
            idx = order[start:start + 32]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(reference(x[idx]), y[idx])
            if mu:
                loss = loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(reference.parameters(), anchor))
            loss.backward()
            optimizer.step()
        for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values()):
            assert torch.equal(a, b), name
    code = ("import sys, torch; from shared.models import build_model; from shared.training import train; "
            "train(build_model('mlp', (1, 28, 28)), torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)), 1, 0.1, 32); "
            "assert 'torch._dynamo' not in sys.modules")
    root = Path(__file__).resolve().parent.parent
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, cwd=root).returncode == 0
