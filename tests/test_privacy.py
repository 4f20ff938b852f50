"""Differential privacy: the accountants against Google's dp-accounting, DP-SGD's clipping and noise through
Opacus, DP-FedAvg's clipping, noise and adaptive clip, the local Laplace mechanism, the client's budget, and
the settings that are refused. Real processes: tests/test_privacy_integration.py."""
from __future__ import annotations

import dataclasses
import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import pld, rdp
from torch import nn

from app.config import RunConfig, update_run_config
from app.privacy import check_model
from client.privacy import BudgetExhausted, ClientPrivacy, dp_sgd
from shared.accumulator import ClippedNoisySum
from shared.errors import ConfigError
from shared.models import MODELS, build_model
from shared.privacy import Accountant, l1_norm, l2_norm, local_laplace, next_clip, split_noise
from shared.protocol import TrainRequest

SETTINGS = [(0.01, 1.0, 1000, 1e-5), (0.1, 1.5, 500, 1e-5), (0.053, 1.1, 380, 1e-6)]  # (q, sigma, steps, delta)


@pytest.mark.parametrize("q,sigma,steps,delta", SETTINGS)
def test_the_accountants_agree_with_dp_accounting_to_one_percent(q, sigma, steps, delta):
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    google_rdp = rdp.RdpAccountant()
    google_rdp.compose(event, steps)
    google_pld = pld.PLDAccountant()
    google_pld.compose(event, steps)
    ours = {kind: Accountant(kind, [[sigma, q, steps]]).epsilon(delta) for kind in ("rdp", "prv")}
    assert ours["rdp"] == pytest.approx(google_rdp.get_epsilon(delta), rel=0.01)
    assert ours["prv"] == pytest.approx(google_pld.get_epsilon(delta), rel=0.01)
    split = Accountant("rdp", [[sigma, q, steps // 2], [sigma, q, steps - steps // 2]])  # history composes
    assert split.epsilon(delta) == pytest.approx(ours["rdp"], rel=1e-6)


def test_dp_sgd_clips_every_examples_gradient_through_opacus():
    """One example per batch, no noise: the step is that example's clipped gradient, so its norm (lr 1) is at
    most the clip, and equal to it for an example whose gradient was larger."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 4, 4) * 50, torch.randint(0, 3, (8,))  # large inputs: large gradients
    for i in range(len(x)):
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        before = [p.detach().clone() for p in model.parameters()]
        stats, rate, steps = dp_sgd(model, x[i:i + 1], y[i:i + 1], epochs=1, lr=1.0, batch_size=1, max_batches=1,
                                    seed=i, momentum=0.0, noise_multiplier=0.0, max_grad_norm=0.5)
        step = math.sqrt(sum(((p.detach() - b) ** 2).sum().item() for p, b in zip(model.parameters(), before)))
        if stats["batches"]:  # Poisson sampling may draw an empty batch: nothing moves then
            assert step <= 0.5 * (1 + 1e-5), step
    plain = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    plain(x).logsumexp(1).sum().backward()
    assert math.sqrt(sum((p.grad ** 2).sum().item() for p in plain.parameters())) > 5  # so clipping was needed


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_model_passes_opacus_module_validator(name, shape):
    from opacus.validators import ModuleValidator
    assert ModuleValidator.validate(build_model(name, shape), strict=False) == []
    check_model(RunConfig(dp="sample", model=name), shape)  # and the run starts


def test_client_level_delta_must_stay_below_one_over_the_registered_clients(tmp_path):
    """Start is refused, naming delta, once there are 1/delta registered clients or more; fewer may start."""
    from app import create_app
    from app.config import ServerConfig
    from app.privacy import delta_problem
    app = create_app(ServerConfig(state_dir=str(tmp_path / "state"), admin_token="a" * 32, enrollment_token="e" * 32,
                                  run=RunConfig(dataset="synthetic", model="mlp", dp="client", delta=0.05)))
    store = app.extensions["meshfed"].store
    try:
        for i in range(20):  # 20 registered clients: delta 0.05 is not below 1/20
            store.pin_client(f"c{i}", "pem", f"fp{i}", 10)
        assert store.client_count() == 20
        r = app.test_client().post("/api/start", headers={"Authorization": "Bearer " + "a" * 32})
        assert r.status_code == 400 and "1/20" in r.get_json()["fields"]["delta"], r.get_json()
        assert delta_problem(RunConfig(dp="client", delta=0.049), 20) is None
        assert delta_problem(RunConfig(dp="sample", delta=0.05), 20) is None  # a client's examples bound it there
    finally:
        store.close()


def test_a_model_opacus_cannot_train_is_refused_before_the_run(monkeypatch):
    monkeypatch.setitem(MODELS, "bn", lambda shape, classes: nn.Sequential(
        nn.Conv2d(shape[0], 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, classes)))
    with pytest.raises(ConfigError) as refused:
        check_model(RunConfig(dp="sample", model="bn"), (1, 28, 28))
    assert "BatchNorm" in refused.value.fields["model"]
    check_model(RunConfig(dp="client", model="bn"), (1, 28, 28))  # server-side DP needs no per-example gradients


def test_dp_sgd_noise_has_the_std_opacus_promises():
    """Zero-gradient batches (a zero-weight model on zero inputs has zero gradients for the weights): every
    weight's step is the noise alone, std lr * sigma * clip / expected batch size."""
    x, y = torch.zeros(256, 1, 8, 8), torch.zeros(256, dtype=torch.long)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64, bias=False))
    nn.init.zeros_(model[1].weight)
    dp_sgd(model, x, y, epochs=1, lr=1.0, batch_size=64, max_batches=1, seed=3, momentum=0.0, noise_multiplier=2.0,
           max_grad_norm=0.5)
    noise = model[1].weight.detach().numpy().ravel()  # 4096 draws
    expected = 2.0 * 0.5 / 64
    assert abs(noise.mean()) < 4 * expected / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(expected, rel=0.05)  # 4096 samples: the std is within ~2% (1 sd)


def test_the_server_clips_each_update_and_noises_the_sum():
    rng = np.random.default_rng(0)
    updates = [{"w": rng.normal(0, s, 1000).astype(np.float32)} for s in (0.001, 0.01, 1.0, 5.0)]
    quiet = ClippedNoisySum(clip=0.5, noise_multiplier=0.0, denominator=4, rng=rng)
    for i, u in enumerate(updates):
        quiet.add(u, 123.0, key=f"c{i}")  # example counts are ignored
    (mean, weight), = quiet.result()
    clipped = [u if l2_norm(u) <= 0.5 else {"w": u["w"] * 0.5 / l2_norm(u)} for u in updates]
    assert np.allclose(mean["w"], sum(c["w"] for c in clipped) / 4, atol=1e-6) and weight == 4
    assert all(l2_norm(c) <= 0.5 + 1e-6 for c in clipped) and quiet.unclipped_fraction() == 0.5
    noisy = ClippedNoisySum(clip=0.5, noise_multiplier=3.0, denominator=4, rng=np.random.default_rng(1))
    zero = {"w": np.zeros(20_000, np.float32)}
    for i in range(4):
        noisy.add(zero, 1.0, key=f"c{i}")
    (mean, _), = noisy.result()
    assert mean["w"].std() == pytest.approx(3.0 * 0.5 / 4, rel=0.03)  # sigma * C on the sum, / 4


def test_the_adaptive_clip_moves_to_the_target_quantile():
    norms = np.random.default_rng(0).lognormal(0.0, 1.0, 100_000)
    target = float(np.quantile(norms, 0.5))
    clip = 0.01
    for _ in range(300):
        clip = next_clip(clip, float((norms <= clip).mean()), target_quantile=0.5, learning_rate=0.2)
    assert clip == pytest.approx(target, rel=0.05)
    assert split_noise(1.0, 100.0) == pytest.approx(1.0, rel=1e-4)  # a count with almost no share costs nothing
    with pytest.raises(ValueError):
        split_noise(1.0, 0.4)  # the count would take the whole budget


def test_local_dp_clips_the_l1_norm_and_adds_laplace_noise():
    delta = {"w": np.full(50_000, 0.01, np.float32)}  # L1 norm 500
    quiet = local_laplace(delta, clip=10.0, epsilon=1e9, rng=np.random.default_rng(0))
    assert l1_norm(quiet) == pytest.approx(10.0, rel=1e-3)
    noisy = local_laplace({"w": np.zeros(50_000, np.float32)}, clip=1.0, epsilon=2.0, rng=np.random.default_rng(0))
    assert noisy["w"].std() == pytest.approx(math.sqrt(2) * 2 * 1.0 / 2.0, rel=0.03)  # Laplace(b): std sqrt(2) b


def test_a_client_keeps_its_accountant_and_refuses_a_round_past_its_budget(tmp_path):
    request = TrainRequest(run_id="r1", round=1, model_version=1, local_epochs=1, lr=0.1, batch_size=50, dp="sample",
                           noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, target_epsilon=2.0)
    privacy = ClientPrivacy(tmp_path / "c0.privacy.json")
    planned = privacy.plan(request, num_examples=5000, epochs=1, batch_size=50, max_batches=0)
    assert planned.event == (1.0, 0.01, 100)
    spent = [privacy.record(request, planned.event) for _ in range(3)]
    assert spent[0] < spent[1] < spent[2] < 2.0
    again = ClientPrivacy(tmp_path / "c0.privacy.json")  # a restarted client goes on counting
    assert again.spent(request) == pytest.approx(spent[2])
    assert again.spent(dataclasses.replace(request, run_id="r2")) == 0.0  # another run starts afresh
    with pytest.raises(BudgetExhausted, match="past the run's budget of 2"):
        for _ in range(100):
            again.record(request, again.plan(request, 5000, 1, 50, 0).event)
    assert again.spent(request) <= 2.0
    with pytest.raises(BudgetExhausted, match="delta"):
        again.plan(dataclasses.replace(request, delta=0.05), num_examples=50, epochs=1, batch_size=10, max_batches=0)
    local = dataclasses.replace(request, dp="local", local_epsilon=0.5, run_id="r3")
    assert again.plan(local, 5000, 1, 50, 0).epsilon == 0.5


@pytest.mark.parametrize("changes,field", [({"dp": "sample", "noise_multiplier": 0}, "noise_multiplier"),
                                           ({"dp": "client", "strategy": "median"}, "dp"),
                                           ({"dp": "client", "stragglers": "merge"}, "stragglers"),
                                           ({"dp": "sample", "strategy": "fedprox", "proximal_mu": 0.1}, "strategy"),
                                           ({"dp": "client", "delta": 0.5}, "delta")])
def test_settings_that_break_the_guarantee_are_refused_with_the_field(changes, field):
    with pytest.raises(ConfigError) as info:
        update_run_config(RunConfig(), changes)
    assert field in info.value.fields
