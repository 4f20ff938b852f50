"""Secure aggregation's arithmetic and checks: Shamir at its threshold, masks that cancel bit for bit with and
without dropouts, a ring that cannot wrap, tampered shares and unsigned keys refused, the rules it cannot be
combined with. The server and clients run in one process here (tests/secagg_harness.py); with real processes
in tests/test_secagg_integration.py."""
from __future__ import annotations

import base64
import itertools
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from app.config import RunConfig, update_run_config
from app.secagg import SecureAggregation
from client.secagg import SecureSession
from shared import crypto, secagg
from shared.errors import ConfigError
from shared.secagg import SecAggError
from tests.secagg_harness import rsa_keys, simulate


def _deltas(n: int, size: int = 2000, seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    deltas = {f"c{i:02d}": {"w": rng.normal(0, 0.1, (size,)).astype(np.float32),
                            "b": rng.normal(0, 0.1, (7,)).astype(np.float32)} for i in range(n)}
    weights = {cid: int(rng.integers(50, 600)) for cid in deltas}
    return deltas, weights


def test_shamir_gives_the_secret_back_from_any_threshold_shares_and_refuses_fewer():
    secret = os.urandom(32)
    shares = secagg.split(secret, [1, 2, 3, 4, 5, 6, 7], 4)
    for subset in itertools.combinations(shares, 4):
        assert secagg.combine({x: shares[x] for x in subset}, 4) == secret
    with pytest.raises(SecAggError, match="3 shares, 4 needed"):
        secagg.combine({x: shares[x] for x in (1, 2, 3)}, 4)
    wrong = {**{x: shares[x] for x in (1, 2, 3)}, 4: shares[4] + 1}  # one share altered: another secret (the
    assert secagg.combine(wrong, 4) != secret                        # server checks each against its commitment)
    with pytest.raises(SecAggError):
        secagg.split(secret, [1, 1, 2], 2)


def test_the_threshold_is_always_a_strict_majority():
    assert [secagg.default_threshold(h) for h in (2, 3, 4, 9, 10)] == [2, 2, 3, 5, 6]
    assert secagg.default_threshold(10, 0.8) == 8


@pytest.mark.parametrize("dropped", [0, 1, 3])  # 0%, 10%, 30% of 10 clients vanish after sharing keys
def test_masks_cancel_and_the_sum_is_the_plain_sum_bit_for_bit(dropped):
    deltas, weights = _deltas(10)
    gone = set(sorted(deltas)[:dropped])
    out = simulate(deltas, weights, drop_after_shares=gone)
    assert not out.abandoned
    assert out.round.stats["recovered"] == dropped and out.round.dropped == sorted(gone)
    assert out.unmasked.dtype == np.uint32 and np.array_equal(out.unmasked, out.plain_sum)
    survivors = [c for c in deltas if c not in gone]
    total = sum(weights[c] for c in survivors)
    expected = np.concatenate([sum(weights[c] * deltas[c][k].astype(np.float64) for c in survivors) / total
                               for k in ("b", "w")])
    np.testing.assert_allclose(out.mean["flat"], expected, atol=1e-7)  # quantisation only: 2^31 levels


def test_secagg_plus_neighbourhoods_are_k_regular_and_still_sum_exactly():
    clients = [f"c{i:02d}" for i in range(20)]
    graph = secagg.neighbours(clients, 10, "run/1")
    assert {len(v) for v in graph.values()} == {10}
    assert [secagg.auto_neighbours(n) for n in (2, 10, 20, 100, 1000)] == [1, 9, 19, 42, 60]
    assert all(u in graph[v] for u in graph for v in graph[u])  # symmetric
    assert secagg.neighbours(clients[:5], 10, "x") == {c: [v for v in clients[:5] if v != c] for c in clients[:5]}
    deltas, weights = _deltas(16, size=300)
    out = simulate(deltas, weights, drop_after_shares={"c03", "c09"}, neighbours=6)
    assert out.round.stats["recovered"] == 2 and {len(v) for v in out.round.graph.values()} == {6}
    assert np.array_equal(out.unmasked, out.plain_sum)


def test_a_round_survives_while_every_neighbourhood_keeps_its_threshold():
    graph = secagg.neighbours([f"c{i}" for i in range(8)], 4, "run/1")  # neighbourhoods of 5, threshold 3
    t = lambda c: secagg.default_threshold(len(graph[c]) + 1)  # noqa: E731
    assert secagg.survives(graph, set(graph["c0"][:2]), t)      # 2 of c0's 5 gone: 3 left
    assert not secagg.survives(graph, set(graph["c0"][:3]), t)  # 3 gone: 2 left, below 3


def test_below_the_threshold_the_round_is_abandoned_not_aggregated():
    deltas, weights = _deltas(10, size=100)
    out = simulate(deltas, weights, drop_after_shares=set(sorted(deltas)[:5]))
    assert out.unmasked is None and out.mean is None
    assert "abandoned the round" in out.abandoned and "are needed" in out.abandoned


def test_the_ring_cannot_wrap_at_the_worst_case():
    """Every client at the edge of the range, one client holding nearly all the weight or all equal: the signed
    sum stays inside int32 and dequantises back to the edge."""
    rng = np.random.default_rng(0)
    for weights in ([10_000_000] + [1] * 99, [1] * 100):
        total, n, clip = sum(weights), len(weights), 0.5
        scale = secagg.ring_scale(clip, n)
        for sign in (1, -1):
            inputs = [secagg.quantise({"x": np.full(1000, sign * 7.0, np.float32)}, w / total, clip, scale, rng)[0]["x"]
                      for w in weights]
            exact = np.sum([q.view(np.int32).astype(np.int64) for q in inputs], axis=0)
            assert np.abs(exact).max() < 2**31
            ring = np.zeros(1000, np.uint32)
            for q in inputs:
                ring += q
            assert np.array_equal(ring.view(np.int32).astype(np.int64), exact)
            np.testing.assert_allclose(secagg.dequantise({"x": ring}, scale, 1.0)["x"], sign * clip, rtol=1e-6)


def test_an_honest_client_never_sends_a_non_finite_update():
    with pytest.raises(SecAggError, match="NaN or infinity"):
        secagg.quantise({"x": np.array([0.1, np.nan], np.float32)}, 0.5, 1.0, secagg.ring_scale(1.0, 2),
                        np.random.default_rng(0))


def _sessions(n: int) -> tuple[dict[str, SecureSession], dict[str, str]]:
    keys = rsa_keys(n)
    ids = [f"c{i}" for i in range(n)]
    return ({cid: SecureSession(k, cid, "run", 1) for cid, k in zip(ids, keys)},
            {cid: crypto.public_pem(k) for cid, k in zip(ids, keys)})


def _roster(sessions: dict[str, SecureSession], pems: dict[str, str], me: str) -> dict:
    others = [c for c in sessions if c != me]
    return {"threshold": len(sessions) // 2 + 1, "weight": 10, "total_weight": 10 * len(sessions),
            "clients": len(sessions), "clip": 1.0, "x": {c: i + 1 for i, c in enumerate(sessions)},
            "neighbours": [{**{k: sessions[c].keys_message()[k] for k in ("client_id", "mask_key", "share_key",
                                                                          "commitment", "signature")},
                            "public_key": pems[c]} for c in others]}


def test_a_tampered_share_is_refused():
    sessions, pems = _sessions(3)
    shares = {c: s.on_roster(_roster(sessions, pems, c))["shares"] for c, s in sessions.items()}
    sealed = bytearray(base64.b64decode(shares["c1"]["c0"]))
    sealed[20] ^= 1
    with pytest.raises(SecAggError, match="tampered"):
        sessions["c0"].on_shares({"shares": {"c1": base64.b64encode(bytes(sealed)).decode(),
                                             "c2": shares["c2"]["c0"]}})
    with pytest.raises(SecAggError, match="tampered"):  # a share for someone else, routed to c0
        sessions["c0"].on_shares({"shares": {"c1": shares["c1"]["c2"]}})
    sessions["c0"].on_shares({"shares": {"c1": shares["c1"]["c0"], "c2": shares["c2"]["c0"]}})  # intact: opens


def test_keys_not_signed_by_the_pinned_key_are_refused_by_clients_and_server():
    sessions, pems = _sessions(3)
    roster = _roster(sessions, pems, "c0")
    roster["neighbours"][0]["mask_key"] = secagg.new_keypair()[1].hex()  # the server slips in a key of its own
    with pytest.raises(SecAggError, match="not signed by its RSA key"):
        sessions["c0"].on_roster(roster)
    sent = []
    server = SecureAggregation(pems.get, lambda cid, data: sent.append(data) or True)
    forged = {**sessions["c1"].keys_message(), "client_id": "c2"}  # c1's keys claimed for c2
    assert server.receive("c2", forged, 100)["reason"].startswith("signature does not verify")
    assert server.receive("c1", {"stage": "keys"}, 10)["accepted"] is False  # malformed: refused, nothing kept


def test_a_client_never_reveals_both_secrets_of_one_client_nor_below_its_threshold():
    sessions, pems = _sessions(4)
    shares = {c: s.on_roster(_roster(sessions, pems, c))["shares"] for c, s in sessions.items()}
    me = sessions["c0"]
    me.on_shares({"shares": {c: shares[c]["c0"] for c in ("c1", "c2", "c3")}})
    with pytest.raises(SecAggError, match="both survivors and dropped"):
        me.on_reveal({"survivors": ["c0", "c1", "c2"], "dropped": ["c2"]})
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        me.on_reveal({"survivors": ["c0", "c1"], "dropped": ["c2", "c3"]})
    reveal = me.on_reveal({"survivors": ["c0", "c1", "c2"], "dropped": ["c3"]})
    assert set(reveal["self_mask"]) == {"c0", "c1", "c2"} and set(reveal["mask_key_shares"]) == {"c3"}
    low = _roster(sessions, pems, "c1")
    low["threshold"] = 2  # of a neighbourhood of 4: two halves could each rebuild a secret
    with pytest.raises(SecAggError, match="more than half"):
        SecureSession(rsa_keys(1)[0], "c1", "run", 1).on_roster(low)


def test_what_the_server_holds_of_each_client_is_masked_and_looks_uniform():
    deltas, weights = _deltas(6, size=20_000)
    out = simulate(deltas, weights)
    for cid, masked in out.masked.items():
        plain = out.inputs[cid]
        assert np.mean(masked == plain) < 1e-3
        # plaintext inputs cluster near 0 (two's complement: near 0 or 2^32); masked ones are uniform on the ring
        assert stats.kstest(masked / 2**32, "uniform").pvalue > 1e-4
        assert stats.kstest(plain / 2**32, "uniform").pvalue < 1e-10


@pytest.mark.parametrize("change,field", [
    ({"strategy": "krum", "byzantine_f": 1, "min_fit_clients": 5}, "secure_aggregation"),
    ({"strategy": "median"}, "secure_aggregation"),
    ({"dp": "client"}, "secure_aggregation"),
    ({"compression": "int8"}, "compression"),
    ({"stragglers": "merge"}, "stragglers"),
    ({"min_updates": 3}, "min_updates"),
])
def test_secure_aggregation_is_refused_with_rules_that_need_each_update(change, field):
    with pytest.raises(ConfigError) as exc:
        update_run_config(RunConfig(), {"secure_aggregation": "secagg+", **change})
    assert set(exc.value.fields) == {field}
    for ok in ({"strategy": "fedadam"}, {"strategy": "fedprox", "proximal_mu": 0.01}, {"dp": "sample"}):
        assert update_run_config(RunConfig(), {"secure_aggregation": "secagg+", **ok}).secure_aggregation == "secagg+"


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                max_size=6), max_leaves=20)
KEYS_MESSAGE = st.fixed_dictionaries({"stage": st.sampled_from(["keys", "shares", "reveal", "x"]), "run_id": JSON,
                                      "round": JSON, "client_id": JSON, "signature": JSON, "mask_key": JSON,
                                      "share_key": JSON, "commitment": JSON, "shares": JSON, "self_mask": JSON,
                                      "mask_key_shares": JSON})


@settings(max_examples=300, deadline=None)
@given(st.one_of(JSON, KEYS_MESSAGE))
def test_any_stage_message_is_checked_or_refused_with_a_reason(raw):
    try:
        message = secagg.check_message(raw)
    except SecAggError as exc:
        assert str(exc)
    else:
        assert set(message) >= {"stage", "run_id", "round", "client_id", "signature"}
        secagg.signed_bytes(message)
    server = SecureAggregation(lambda cid: None, lambda cid, data: True)
    assert server.receive("c0", raw, 100)["accepted"] is False  # no key pinned, no round open: refused, no raise
