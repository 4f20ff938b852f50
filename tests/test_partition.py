import numpy as np
import pytest

from shared.partition import dirichlet, iid, partition, shards, train_holdout

LABELS = np.repeat(np.arange(10), 100)  # 1000 samples, 100 per class


def _check_disjoint_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partitions_are_disjoint_cover_and_deterministic(scheme):
    a = partition(LABELS, scheme, 10, alpha=0.5, seed=3)
    b = partition(LABELS, scheme, 10, alpha=0.5, seed=3)
    _check_disjoint_cover(a, len(LABELS))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = partition(LABELS, scheme, 10, alpha=0.5, seed=4)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def _mean_tv_distance(parts):
    """Mean total-variation distance between each client's label histogram and the global one."""
    glob = np.bincount(LABELS, minlength=10) / len(LABELS)
    return np.mean([0.5 * np.abs(np.bincount(LABELS[p], minlength=10) / len(p) - glob).sum() for p in parts])


def test_dirichlet_label_skew_is_measurable_and_grows_as_alpha_shrinks():
    skew_iid = _mean_tv_distance(iid(LABELS, 10, seed=0))
    skew_05 = _mean_tv_distance(dirichlet(LABELS, 10, alpha=0.5, seed=0))
    skew_01 = _mean_tv_distance(dirichlet(LABELS, 10, alpha=0.1, seed=0, min_size=1))
    assert skew_iid < 0.15
    assert skew_05 > 2 * skew_iid
    assert skew_01 > skew_05


def test_shards_give_two_classes_per_client():
    parts = shards(LABELS, 10, shards_per_client=2, seed=0)
    _check_disjoint_cover(parts, len(LABELS))
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)
    assert all(len(p) == 100 for p in parts)


def test_holdout_is_twenty_percent_and_disjoint():
    idx = np.arange(100, 200)
    train, hold = train_holdout(idx, seed=1)
    assert len(hold) == 20 and len(train) == 80
    assert set(train).isdisjoint(hold) and set(train) | set(hold) == set(idx)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown partition"):
        partition(LABELS, "nope", 2)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet(LABELS, 2, alpha=0)
