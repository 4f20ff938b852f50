"""mesh/: signed gossip messages, trust (roster, operator confirmation, QR), mixing math, and real
zeroconf discovery on loopback."""
from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import zxingcpp
from PIL import Image

from mesh.discovery import Discovery, static_peers
from mesh.gossip import choose_peers, mix
from mesh.trust import Trust, fingerprint_qr
from mesh.wire import MAX_SKEW_SECONDS, MeshRefused, ReplayGuard, open_message, seal
from shared import crypto
from shared.cluster import wait_until

LIMIT = 1 << 20


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return {name: crypto.load_or_create_key(d, name) for name in ("a", "b", "stranger")}


def fp(key) -> str:
    return crypto.fingerprint(crypto.public_pem(key))


@pytest.fixture
def trust(tmp_path, keys):
    t = Trust(tmp_path / "trust.json")
    t.set_roster({"a": fp(keys["a"]), "b": fp(keys["b"])})
    return t


def weights(value: float = 1.0) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), value, np.float32), "b": np.arange(3, dtype=np.float32)}


def refused(body: bytes, trust: Trust, replay: ReplayGuard | None = None, **kw) -> str:
    with pytest.raises(MeshRefused) as exc:
        open_message(body, trust, replay or ReplayGuard(), LIMIT, **kw)
    return exc.value.reason


def test_a_sealed_message_opens_to_the_same_weights(keys, trust):
    body = seal(keys["a"], "a", weights(2.5), base_version=7, local_steps=30, num_examples=600)
    header, got = open_message(body, trust, ReplayGuard(), LIMIT)
    assert (header.sender, header.base_version, header.local_steps, header.num_examples) == ("a", 7, 30, 600)
    assert all(np.array_equal(got[k], weights(2.5)[k]) for k in got)


def test_every_flipped_byte_is_refused(keys, trust):
    body = seal(keys["a"], "a", weights(), base_version=1, local_steps=1, num_examples=10)
    head_end = 8 + int.from_bytes(body[4:8], "big")
    for pos in (0, 20, head_end - 30, head_end + 10, len(body) - 5):  # frame, header, signature, payload
        tampered = bytearray(body)
        tampered[pos] ^= 0x01
        assert refused(bytes(tampered), trust) in {"malformed", "bad_signature", "key_mismatch", "unknown_peer"}


def test_unsigned_replayed_stale_and_nan_messages_are_refused(keys, trust):
    body = seal(keys["a"], "a", weights(), base_version=1, local_steps=1, num_examples=10)
    n = int.from_bytes(body[4:8], "big")
    head = json.loads(body[8:8 + n])
    head["signature"] = ""
    unsigned = json.dumps(head).encode()
    assert refused(body[:4] + len(unsigned).to_bytes(4, "big") + unsigned + body[8 + n:], trust) == "bad_signature"
    replay = ReplayGuard()
    open_message(body, trust, replay, LIMIT)
    assert refused(body, trust, replay) == "replay"
    assert refused(body, trust, now=time.time() + MAX_SKEW_SECONDS + 5) == "stale"
    nan = seal(keys["a"], "a", weights(float("nan")), base_version=1, local_steps=1, num_examples=10)
    assert refused(nan, trust) == "non_finite"
    assert refused(b"MFG1" + b"\0" * 4, trust) == "malformed"
    with pytest.raises(MeshRefused, match="too_large"):
        open_message(body, trust, ReplayGuard(), max_bytes=100)


def test_a_stranger_is_refused_until_an_operator_confirms_its_fingerprint(keys, trust, tmp_path):
    body = seal(keys["stranger"], "stranger", weights(), base_version=1, local_steps=1, num_examples=10)
    assert refused(body, trust) == "unknown_peer"
    # An impostor using a roster member's id with its own key is refused even after confirmation.
    impostor = seal(keys["stranger"], "a", weights(), base_version=1, local_steps=1, num_examples=10)
    Trust(tmp_path / "trust.json").confirm(fp(keys["stranger"]))  # the CLI does this, in another process
    again = Trust(tmp_path / "trust.json")                          # what survives a restart
    header, _ = open_message(body, again, ReplayGuard(), LIMIT)
    assert header.sender == "stranger"
    assert refused(impostor, again) == "key_mismatch"


def test_the_fingerprint_qr_code_decodes_back_offline(keys, tmp_path):
    fingerprint = fp(keys["a"])
    text = fingerprint_qr(fingerprint, tmp_path)
    assert len(text.splitlines()) > 20 and (tmp_path / "fingerprint.svg").read_text().startswith("<?xml")
    decoded = zxingcpp.read_barcodes(Image.open(tmp_path / "fingerprint.png").convert("L"))
    assert [r.text for r in decoded] == [fingerprint]


def test_mix_is_the_example_weighted_average():
    own = {"w": np.array([1.0, 2.0], np.float32)}
    peers = [({"w": np.array([3.0, 6.0], np.float32)}, 300), ({"w": np.array([0.0, 0.0], np.float32)}, 200)]
    # (100 * [1, 2] + 300 * [3, 6] + 200 * [0, 0]) / 600 = [1000/600, 2000/600]
    np.testing.assert_allclose(mix(own, 100, peers)["w"], [1000 / 600, 2000 / 600], rtol=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        mix(own, 100, [({"w": np.zeros(3, np.float32)}, 10)])
    assert len(set(choose_peers(list(range(10)), 3, random.Random(0)))) == 3
    assert choose_peers([1], 3, random.Random(0)) == [1]


def test_static_peers_parse_and_refuse_garbage():
    assert [(p.host, p.port) for p in static_peers("127.0.0.1:7001, 10.0.0.2:7002")] == [("127.0.0.1", 7001),
                                                                                          ("10.0.0.2", 7002)]
    with pytest.raises(ValueError, match="host:port"):
        static_peers("nohost")


def test_zeroconf_discovers_peers_on_loopback_and_forgets_those_that_leave():
    nodes = [Discovery(f"m{i}", f"SHA256:{i}", "127.0.0.1", 7300 + i, model_version=i, interfaces=["127.0.0.1"])
             for i in range(3)]
    try:
        for node in nodes:
            node.start()
        wait_until(lambda: all(len(n.peers()) == 2 for n in nodes), 30, "discovery", 0.1)
        seen = {n.client_id: sorted((p.client_id, p.port, p.fingerprint, p.model_version) for p in n.peers())
                for n in nodes}
        assert seen["m0"] == [("m1", 7301, "SHA256:1", 1), ("m2", 7302, "SHA256:2", 2)]
        assert all(len(v) == 2 for v in seen.values())
        nodes[1].set_model_version(9)  # re-announced in the TXT record
        wait_until(lambda: {p.client_id: p.model_version for p in nodes[0].peers()}["m1"] == 9, 15,
                   "the new model version to be seen", 0.1)
        assert {p.client_id: p.model_version for p in nodes[0].peers()}["m1"] == 9
        nodes[2].close()  # goodbye packets: the others forget it
        wait_until(lambda: all(len(n.peers()) == 1 for n in nodes[:2]), 15, "the goodbye", 0.1)
        assert [sorted(p.client_id for p in n.peers()) for n in nodes[:2]] == [["m1"], ["m0"]]
    finally:
        for node in nodes:
            node.close()


def test_operator_commands_show_and_confirm_a_fingerprint(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    def client(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "run_client.py"), "--key-dir", str(tmp_path), *args],
                              capture_output=True, text=True, timeout=120)

    shown = client("--client-id", "stranger", "--show-fingerprint")
    fingerprint = fp(crypto.load_or_create_key(tmp_path, "stranger"))  # the key the command created
    assert shown.returncode == 0 and f"stranger: {fingerprint}" in shown.stdout
    assert [r.text for r in zxingcpp.read_barcodes(Image.open(tmp_path / "stranger-qr" / "fingerprint.png"))] \
        == [fingerprint]
    assert client("--client-id", "a", "--confirm-peer", "SHA256:nothex").returncode == 2
    assert client("--client-id", "a", "--confirm-peer", fingerprint).returncode == 0
    assert fingerprint in Trust(tmp_path / "a.trust.json").confirmed


def test_the_roster_is_taken_only_with_the_pinned_servers_signature(tmp_path, keys):
    from shared.protocol import signed_roster

    server, other = crypto.generate_key(), crypto.generate_key()
    t = Trust(tmp_path / "t.json")
    t.accept_roster(signed_roster(server, {"a": fp(keys["a"])}))
    assert t.roster == {"a": fp(keys["a"])} and t.server_fingerprint == fp(server)
    forged = signed_roster(server, {"a": fp(keys["a"])})
    forged["clients"] = {"a": fp(keys["stranger"])}  # swap a's key after signing
    with pytest.raises(MeshRefused, match="bad_signature"):
        t.accept_roster(forged)
    with pytest.raises(MeshRefused, match="key_mismatch"):  # another server: its key is not the pinned one
        t.accept_roster(signed_roster(other, {"a": fp(keys["stranger"])}))
    assert Trust(tmp_path / "t.json").roster == {"a": fp(keys["a"])}  # unchanged, also on disk


def test_the_gossip_endpoint_answers_hostile_requests_with_a_json_4xx(tmp_path, keys):
    """Content-Length 'abc', a header nested 60,000 deep, a round of 1e999, an unknown method, a body shorter
    than announced: each gets a 4xx with a reason (they used to drop the connection unanswered)."""
    import socket
    import struct
    import threading

    from mesh.config import MeshConfig
    from mesh.node import MeshNode

    node = MeshNode(MeshConfig(interfaces=("127.0.0.1",)), "a", keys["a"], None, tmp_path / "a.mesh",
                    threading.Lock(), lr=0.05, batch_size=32, trust_file=tmp_path / "trust.json")
    node.server.RequestHandlerClass.timeout = 2
    threading.Thread(target=node.server.serve_forever, daemon=True).start()

    def ask(request: bytes) -> tuple[int, dict]:
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
            s.sendall(request)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), json.loads(body) if body.startswith(b"{") else {}

    def post(body: bytes, length: str | None = None) -> tuple[int, dict]:
        return ask(b"POST /mesh/gossip HTTP/1.1\r\nHost: x\r\nContent-Length: " +
                   (length or str(len(body))).encode() + b"\r\n\r\n" + body)

    def frame(head: bytes) -> bytes:
        return b"MFG1" + struct.pack(">I", len(head)) + head + b"payload"

    try:
        assert post(b"", "abc") == (400, {"reason": "malformed", "message": "send a Content-Length of 1..67108864 "
                                                                             "bytes"})
        assert post(b"", str(1 << 40))[0] == 413
        status, reply = post(frame(b'{"sender": ' + b"[" * 60_000 + b"]" * 60_000 + b"}"))
        assert (status, reply["reason"]) == (400, "malformed")
        sealed = seal(keys["a"], "a", weights(), base_version=1, local_steps=1, num_examples=10)
        n = struct.unpack(">I", sealed[4:8])[0]
        head = sealed[8:8 + n].replace(b'"base_version": 1', b'"base_version": 1e999')
        status, reply = post(b"MFG1" + struct.pack(">I", len(head)) + head + sealed[8 + n:])
        assert (status, reply["reason"]) == (400, "malformed") and "base_version" in reply["message"]
        assert post(b"MFG1short", "100")[0] == 400  # ends before its Content-Length
        assert ask(b"BREW /mesh/gossip HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 405
    finally:
        node.server.shutdown()
        node.server.server_close()


def test_gossip_in_fp16_halves_the_bytes_and_opens_to_float32_close_to_the_weights(keys, trust):
    w = {"w": np.random.default_rng(0).normal(0, 0.05, (200, 100)).astype(np.float32), "n": np.array([4], np.int64)}
    full = seal(keys["a"], "a", w, base_version=1, local_steps=3, num_examples=10)
    half = seal(keys["a"], "a", w, base_version=1, local_steps=3, num_examples=10, encoding="fp16")
    assert len(half) < 0.55 * len(full)
    header, got = open_message(half, trust, ReplayGuard(), 1 << 26)
    assert header.encoding == "fp16" and got["w"].dtype == np.float32 and got["n"].tolist() == [4]
    assert np.abs(got["w"] - w["w"]).max() <= np.abs(w["w"]).max() * 2.0 ** -11
    lying = seal(keys["a"], "a", {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in w.items()},
                 base_version=1, local_steps=3, num_examples=10)  # fp16 arrays under a float32 header
    with pytest.raises(MeshRefused) as info:
        open_message(lying, trust, ReplayGuard(), 1 << 26)
    assert info.value.reason == "malformed"
