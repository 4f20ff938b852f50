"""Aggregators against hand-computed values and brute-force oracles; FedOpt against its equations."""
import math

import numpy as np
import pytest
import torch

from app import strategy
from app.config import RunConfig, update_run_config
from client.behaviour import partial_batches, poison
from shared import aggregate as agg
from shared.errors import ConfigError
from shared.protocol import decode_weights, encode_weights


def test_median_and_trimmed_mean_hand_computed():
    x = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [100.0, -50.0]], dtype=np.float32)
    np.testing.assert_allclose(agg.coordinate_median(x), [2.5, 15.0])
    np.testing.assert_allclose(agg.trimmed_mean(x, 0.25), [2.5, 15.0])  # drop 1 at each end
    np.testing.assert_allclose(agg.trimmed_mean(x, 0.0), x.mean(axis=0))
    with pytest.raises(ValueError):
        agg.trimmed_mean(x, 0.5)


def test_trimmed_mean_matches_a_sort_based_oracle():
    x = np.random.default_rng(0).normal(size=(11, 50))
    k = 2
    oracle = np.array([np.mean(sorted(col)[k:-k]) for col in x.T])
    np.testing.assert_allclose(agg.trimmed_mean(x, 0.2), oracle)


def brute_krum_scores(x, f):
    n = len(x)
    return np.array([sum(sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(n) if j != i)[:n - f - 2])
                     for i in range(n)])


def test_krum_scores_match_brute_force_and_reject_the_outlier():
    rng = np.random.default_rng(1)
    x = np.vstack([rng.normal(0, 1, (5, 4)), [[50, 50, 50, 50]]])
    np.testing.assert_allclose(agg.krum_scores(x, 1), brute_krum_scores(x, 1), rtol=1e-9)
    chosen_mean, chosen = agg.multikrum(x, 1, 1)
    assert 5 not in chosen and np.array_equal(chosen_mean, x[chosen[0]])
    _, chosen3 = agg.multikrum(x, 1, 3)
    assert list(chosen3) == sorted(np.argsort(brute_krum_scores(x, 1))[:3])
    with pytest.raises(ValueError, match="n > 2f"):
        agg.krum_scores(x[:4], 1)


def test_bulyan_ignores_outliers_and_checks_its_precondition():
    rng = np.random.default_rng(2)
    honest = rng.normal(1.0, 0.1, (7, 6))
    x = np.vstack([honest, np.full((2, 6), 1000.0)])  # n = 9: enough for f=1 (7), not for f=2 (11)
    with pytest.raises(ValueError, match="4f"):
        agg.bulyan(x, 2)
    out = agg.bulyan(x, 1)  # n = 9 >= 7
    assert np.all(out > honest.min(axis=0) - 1e-9) and np.all(out < honest.max(axis=0) + 1e-9)
    # with no attackers and f=0 Bulyan keeps every row and averages the values nearest the median
    same = np.ones((3, 2))
    np.testing.assert_allclose(agg.bulyan(same, 0), [1.0, 1.0])


def fedopt_by_hand(kind, w, grads, lr, b1, b2, tau):
    m, v = 0.0, tau * tau
    for g in grads:
        if kind == "fedavgm":
            m = b1 * m + g
            w = w + lr * m
            continue
        m = b1 * m + (1 - b1) * g
        if kind == "fedadam":
            v = b2 * v + (1 - b2) * g * g
        elif kind == "fedyogi":
            v = v - (1 - b2) * g * g * math.copysign(1.0, v - g * g)
        else:
            v = v + g * g
        w = w + lr * m / (math.sqrt(v) + tau)
    return w


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_fedopt_follows_the_update_equations_and_its_state_round_trips(kind):
    grads = [0.5, -0.2, 0.3]
    w = {"p": np.array([1.0], dtype=np.float32)}
    state = {}
    for i, g in enumerate(grads):
        w, state = agg.fedopt_step(w, {"p": np.array([g], np.float32)}, state, kind, 0.1, 0.9, 0.99, 1e-3)
        if i == 0:  # save and restore the state as a checkpoint would (safetensors, no pickle)
            state = decode_weights(encode_weights(state))
    expected = fedopt_by_hand(kind, 1.0, grads, 0.1, 0.9, 0.99, 1e-3)
    assert w["p"][0] == pytest.approx(expected, rel=1e-5)


def test_anomaly_scores_single_out_the_attacker():
    rng = np.random.default_rng(3)
    x = np.vstack([rng.normal(1.0, 0.1, (9, 20)), -10 * np.ones((1, 20))])
    s = agg.anomaly_scores(x, x[:9].mean(axis=0))
    assert int(np.argmax(s["norm_z"])) == 9 and int(np.argmax(s["cosine_z"])) == 9 and s["cosine_z"][9] > 2.5
    # the same scores from named float32 arrays, one norm and one dot product per update as it arrives
    named = [{"a": row[:8].reshape(2, 4).astype(np.float32), "b": row[8:].astype(np.float32)} for row in x]
    mean = x[:9].mean(axis=0).astype(np.float32)
    step = {"a": mean[:8].reshape(2, 4), "b": mean[8:]}
    ids = [f"c{i}" for i in range(10)]
    flagged = agg.flag_anomalies(ids, [agg.update_norm(u) for u in named], [agg.dot(u, step) for u in named],
                                 agg.update_norm(step), 2.5)
    assert list(flagged) == ["c9"]
    for key in s:
        assert flagged["c9"][key] == pytest.approx(s[key][9], rel=1e-4, abs=1e-4)


def test_flag_anomalies_names_the_update_against_the_last_step_and_needs_three():
    rng = np.random.default_rng(0)
    shapes = {"w": (4, 5), "b": (5,)}
    step = {k: np.full(v, 0.1, np.float32) for k, v in shapes.items()}  # where the model moved last round
    honest = [{k: (0.1 + 0.01 * rng.standard_normal(v)).astype(np.float32) for k, v in shapes.items()}
              for _ in range(5)]
    attacker = {k: -v for k, v in honest[0].items()}  # as long as an honest one, the other way
    updates = [*honest, attacker]
    norms, dots = [agg.update_norm(u) for u in updates], [agg.dot(u, step) for u in updates]
    ids = [f"c{i}" for i in range(6)]
    flagged = agg.flag_anomalies(ids, norms, dots, agg.update_norm(step), 2.0)
    assert list(flagged) == ["c5"] and flagged["c5"]["cosine_distance"] > 1.9, flagged
    assert agg.flag_anomalies(ids[:2], norms[4:], dots[4:], agg.update_norm(step), 1.5) == {}  # two say nothing
    # a run's first round has no step: only the norm can stand out, and here it does not
    assert agg.flag_anomalies(ids, norms, [0.0] * 6, 0.0, 2.0) == {}


def brute_nnm(x, f):
    """Nearest-neighbour mixing by its definition: each row -> mean of its n - f nearest rows."""
    n = len(x)
    out = []
    for i in range(n):
        dist = [float(np.sum((x[i].astype(np.float64) - x[j]) ** 2)) for j in range(n)]
        nearest = sorted(range(n), key=lambda j: (dist[j], j))[:n - f]
        out.append(np.mean([x[j] for j in nearest], axis=0))
    return np.array(out)


def test_nearest_neighbor_mixing_matches_its_definition_and_mixes_an_outlier_away():
    rng = np.random.default_rng(3)
    x = np.vstack([rng.normal(0, 1, (7, 5)), [[40, -40, 40, -40, 40]]]).astype(np.float32)
    np.testing.assert_allclose(agg.nearest_neighbor_mixing(x, 2), brute_nnm(x, 2), rtol=1e-5, atol=1e-6)
    # f = 1: the 7 nearest rows of every honest row are the 7 honest rows, never the outlier
    honest_mean = np.tile(x[:7].mean(axis=0), (7, 1))
    np.testing.assert_allclose(agg.nearest_neighbor_mixing(x, 1)[:7], honest_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(agg.nearest_neighbor_mixing(x, 0), np.tile(x.mean(axis=0), (8, 1)), atol=1e-5)
    with pytest.raises(ValueError, match="f < n/2"):
        agg.nearest_neighbor_mixing(x, 4)


def cfg(**kw):
    return update_run_config(RunConfig(min_fit_clients=10), kw)


def test_median_after_nnm_returns_the_honest_mean_and_nnm_is_validated():
    g = {"w": np.zeros(8, np.float32)}
    ups = updates(n=7, attackers=2)
    honest_mean = np.mean([d["w"] for d, _ in ups[:5]], axis=0)
    mixed, _ = strategy.aggregate(cfg(strategy="median", mixing="nnm", byzantine_f=2), g, ups, {})
    plain, _ = strategy.aggregate(cfg(strategy="median"), g, ups, {})
    np.testing.assert_allclose(mixed["w"], honest_mean, rtol=1e-5)  # every honest row mixed to this
    assert np.abs(plain["w"] - honest_mean).max() > 0.01             # the plain median is one client's value
    for changes, field in [({"strategy": "fedavg", "mixing": "nnm", "byzantine_f": 1}, "mixing"),
                           ({"strategy": "median", "mixing": "nnm"}, "byzantine_f"),
                           ({"strategy": "median", "mixing": "nnm", "byzantine_f": 5}, "byzantine_f"),
                           ({"mixing": "average"}, "mixing")]:
        with pytest.raises(ConfigError) as info:
            update_run_config(RunConfig(min_fit_clients=10), changes)
        assert field in info.value.fields, changes


def updates(n=6, attackers=0, seed=0):
    rng = np.random.default_rng(seed)
    out = [({"w": rng.normal(1.0, 0.1, 8).astype(np.float32)}, 10) for _ in range(n - attackers)]
    out += [({"w": np.full(8, -100.0, np.float32)}, 10) for _ in range(attackers)]
    return out


@pytest.mark.parametrize("name,extra", [("median", {}), ("trimmed_mean", {"trim_beta": 0.2}),
                                        ("krum", {"byzantine_f": 1}), ("multikrum", {"byzantine_f": 1}),
                                        ("bulyan", {"byzantine_f": 1})])
def test_robust_strategies_resist_one_attacker_where_fedavg_does_not(name, extra):
    g = {"w": np.zeros(8, np.float32)}
    ups = updates(n=7, attackers=1)
    robust, _ = strategy.aggregate(cfg(strategy=name, **extra), g, ups, {})
    plain, _ = strategy.aggregate(cfg(strategy="fedavg"), g, ups, {})
    assert np.all(robust["w"] > 0.5) and np.all(plain["w"] < -10)


def test_strategy_preconditions_and_validation():
    with pytest.raises(ValueError, match="needs at least 5"):
        strategy.aggregate(cfg(strategy="krum", byzantine_f=1), {"w": np.zeros(8, np.float32)}, updates(n=4), {})
    with pytest.raises(ConfigError) as info:
        update_run_config(RunConfig(), {"strategy": "bulyan", "byzantine_f": 2, "min_fit_clients": 10})
    assert "4f + 3" in info.value.fields["min_fit_clients"]
    with pytest.raises(ConfigError) as info:
        update_run_config(RunConfig(), {"strategy": "fedprox"})
    assert "proximal_mu" in info.value.fields
    with pytest.raises(ConfigError):
        update_run_config(RunConfig(), {"strategy": "nope"})


def test_a_plugged_in_strategy_is_selectable_by_name():
    @strategy.register("test_keep_global")
    def keep(global_weights, ups, state, cfg):
        return global_weights, {"calls": state.get("calls", np.zeros(1)) + 1}

    c = update_run_config(RunConfig(), {"strategy": "test_keep_global"})
    g = {"w": np.zeros(8, np.float32)}
    w, state = strategy.aggregate(c, g, updates(), {})
    w, state = strategy.aggregate(c, w, updates(), state)
    assert w is g and state["calls"][0] == 2
    del strategy.STRATEGIES["test_keep_global"]


def test_fedprox_term_keeps_local_weights_near_the_global_model():
    from shared.models import build_model
    from shared.training import train

    x, y = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))
    drift = {}
    for mu in (0.0, 10.0):
        model = build_model("mlp", (1, 28, 28), seed=0)
        start = [p.detach().clone() for p in model.parameters()]
        train(model, x, y, epochs=3, lr=0.1, batch_size=32, seed=0, proximal_mu=mu)
        drift[mu] = sum(float(((p.detach() - s) ** 2).sum()) for p, s in zip(model.parameters(), start))
    assert drift[10.0] < 0.7 * drift[0.0], drift


def test_attacks_and_partial_work():
    d = {"w": np.array([1.0, -2.0], np.float32)}
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(poison(d, "sign_flip", 10, rng)["w"], [-10.0, 20.0])
    np.testing.assert_allclose(poison(d, "scale", 3, rng)["w"], [3.0, -6.0])
    g = poison({"w": np.zeros(10000, np.float32)}, "gaussian", 2.0, rng)["w"]
    assert abs(g.std() - 2.0) < 0.1
    assert poison(d, "", 10, rng) is d
    assert partial_batches(320, 32, 1, slowdown=1.0) == 0          # no cap
    assert partial_batches(320, 32, 2, slowdown=4.0) == 5          # 20 batches / 4
    assert partial_batches(320, 32, 2, slowdown=4.0, cap=3) == 3


def test_all_strategies_are_registered():
    assert set(strategy.STRATEGIES) >= {"fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
                                        "krum", "multikrum", "median", "trimmed_mean", "bulyan"}
