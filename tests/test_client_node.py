"""The client's model downloads: each model fetched once, and never a cached model of another server."""
from __future__ import annotations

import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests

from client.node import Node, NodeConfig
from shared.protocol import TrainRequest, encode_weights, sha256_hex


def serve_models(models: dict[int, bytes], steps: dict[tuple[int, int], bytes] | None = None) -> ThreadingHTTPServer:
    """A loopback HTTP server answering GET /api/model/<version> from `models`, and GET
    /api/model/<version>/delta?from=<base> from `steps` (404 when it has none), as the real one does."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.paths.append(self.path)
            parts = self.path.split("/")
            version = int(parts[3])
            if len(parts) == 5:  # a coded step: the full model's sha256 in the header, as the server sends it
                body = (steps or {}).get((int(parts[4].split("from=")[1]), version))
                if body is None:
                    self.send_error(404)
                    return
                digest = sha256_hex(models[version])
            else:
                body = models[version]
                digest = sha256_hex(body)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Model-SHA256", digest)
            self.end_headers()
            self.wfile.write(body)

        paths: list[str] = []

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_cached_model_is_reused_only_while_its_sha256_matches(tmp_path):
    old, new = encode_weights({"w": np.zeros(3, np.float32)}), encode_weights({"w": np.ones(3, np.float32)})
    models = {3: old}
    server = serve_models(models)
    try:
        config = NodeConfig("c0", f"http://127.0.0.1:{server.server_port}", "token", key_dir=str(tmp_path))
        node = Node(config, trainer=None)  # downloads only: no training here
        assert node.fetch_model(3, sha256_hex(old))[0] == sha256_hex(old)
        node.fetch_model(3, sha256_hex(old))
        node.fetch_model(3)  # no sha256 given (an older server): the version decides
        assert node.models.downloads == 1

        # The server was reset onto a fresh state dir: its version 3 is another model now.
        models[3] = new
        digest, weights = node.fetch_model(3, sha256_hex(new))
        assert digest == sha256_hex(new) and node.models.downloads == 2 and weights["w"].tolist() == [1, 1, 1]

        # A server whose version 3 is not the model it asked us to train from: refused, not trained from.
        with pytest.raises(requests.RequestException, match="not the one"):
            node.fetch_model(3, sha256_hex(old))
        assert node.fetch_model(3)[0] == sha256_hex(new) and node.models.downloads == 2  # kept the verified one
    finally:
        server.shutdown()
        server.server_close()


def test_a_request_for_an_unknown_compression_is_skipped_before_any_download(tmp_path, caplog):
    models = {1: encode_weights({"w": np.zeros(3, np.float32)})}
    server = serve_models(models)
    try:
        config = NodeConfig("c0", f"http://127.0.0.1:{server.server_port}", "token", key_dir=str(tmp_path))
        node = Node(config, trainer=None)
        node.handle(TrainRequest("run", 1, 1, 1, 0.05, 32, compression="zstd"))
        assert node.models.downloads == 0 and "compression 'zstd'" in caplog.text
    finally:
        server.shutdown()
        server.server_close()


def test_the_client_trains_with_the_momentum_the_server_asks_for(tmp_path):
    from client.trainer import DataConfig, LocalTrainer
    from shared.models import build_model, get_weights

    class Recording(LocalTrainer):
        def fit(self, *args, **kwargs):
            self.asked = kwargs.get("momentum")
            return super().fit(*args, **kwargs)

    trainer = Recording(DataConfig(dataset="synthetic", partition="iid", num_clients=10, client_index=0), "mlp")
    models = {1: encode_weights(get_weights(build_model("mlp", (1, 28, 28), seed=0)))}
    server = serve_models(models)  # answers GET only: the update's POST is refused, which is fine here
    try:
        node = Node(NodeConfig("c0", f"http://127.0.0.1:{server.server_port}", "token", key_dir=str(tmp_path)),
                    trainer=trainer)
        node.handle(TrainRequest("run", 1, 1, 1, 0.05, 32, max_batches=2, momentum=0.9))
        assert trainer.asked == 0.9 and node.models.downloads == 1
    finally:
        server.shutdown()
        server.server_close()


def test_mesh_steps_train_with_the_momentum_of_the_last_round(tmp_path):
    """Offline, a client's gossip steps train like the server's last round asked: same lr, batch size
    and momentum (no peers here: the step trains and finds nobody to exchange with)."""
    from client.trainer import DataConfig, LocalTrainer
    from mesh.config import MeshConfig
    from shared.models import build_model, get_weights

    class Recording(LocalTrainer):
        def fit(self, *args, **kwargs):
            self.asked = (args[2], args[3], kwargs.get("momentum"))
            return super().fit(*args, **kwargs)

    trainer = Recording(DataConfig(dataset="synthetic", partition="iid", num_clients=10, client_index=0), "mlp")
    weights = get_weights(build_model("mlp", (1, 28, 28), seed=0))
    server = serve_models({1: encode_weights(weights)})
    mesh = MeshConfig(host="127.0.0.1", port=0, local_batches=2, interfaces=("127.0.0.1",))
    node = Node(NodeConfig("c0", f"http://127.0.0.1:{server.server_port}", "token", key_dir=str(tmp_path),
                           mesh=mesh), trainer=trainer)
    try:
        node.handle(TrainRequest("run", 1, 1, 1, 0.02, 16, max_batches=2, momentum=0.5))
        node.mesh._enter((1, weights), offline_for=6.0)
        node.mesh._gossip_step()
        assert trainer.asked == (0.02, 16, 0.5)
        assert node.mesh.contribution.local_steps == 1
    finally:
        node.mesh.close()
        server.shutdown()
        server.server_close()


def test_a_coded_step_is_used_only_when_it_rebuilds_the_model_else_the_whole_model_is_fetched(tmp_path):
    from shared.compression import DOWNLINK, apply_step, compress
    rng = np.random.default_rng(0)
    v1 = {"w": rng.normal(size=(40, 30)).astype(np.float32), "b": rng.normal(size=30).astype(np.float32)}
    step = compress({k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in v1.items()}, DOWNLINK, rng)
    v2 = apply_step(v1, step, DOWNLINK)  # what the server commits: v1 plus the coded step
    wrong = compress({k: np.ones_like(v) for k, v in v1.items()}, DOWNLINK, rng)
    models = {1: encode_weights(v1), 2: encode_weights(v2), 3: encode_weights(apply_step(v2, step, DOWNLINK))}
    steps = {(1, 2): zlib.compress(encode_weights(step), 1),  # as app/downlink.py serves them
             (2, 3): zlib.compress(encode_weights(wrong), 1)}  # the second does not rebuild v3
    server = serve_models(models, steps)
    handler_paths = server.RequestHandlerClass.paths
    try:
        node = Node(NodeConfig("c0", f"http://127.0.0.1:{server.server_port}", "token", key_dir=str(tmp_path)),
                    trainer=None)
        node.models.coded = True  # as a train request with download_compression int8 sets it
        node.fetch_model(1, sha256_hex(models[1]))
        assert node.models.last == (1, len(models[1]), False)  # nothing held yet: the whole model
        digest, weights = node.fetch_model(2, sha256_hex(models[2]))
        assert digest == sha256_hex(models[2]) and all((weights[k] == v2[k]).all() for k in v2)
        assert node.models.last == (2, len(steps[(1, 2)]), True) and len(steps[(1, 2)]) < len(models[2]) / 3
        digest, _ = node.fetch_model(3, sha256_hex(models[3]))  # a wrong step: its result fails the sha256
        assert digest == sha256_hex(models[3]) and node.models.last == (3, len(models[3]), False)
        assert handler_paths[-2:] == ["/api/model/3/delta?from=2", "/api/model/3"]
        node.models.cache = None
        node.fetch_model(3, sha256_hex(models[3]))  # nothing held: no step asked for
        assert handler_paths[-1] == "/api/model/3"
        node.models.cache, node.models.coded, asked = None, False, len(handler_paths)
        node.fetch_model(1, sha256_hex(models[1]))  # a run that does not code its downloads: no step asked for
        node.fetch_model(2, sha256_hex(models[2]))  # (no 404 round trip before every download)
        assert handler_paths[asked:] == ["/api/model/1", "/api/model/2"]
    finally:
        server.shutdown()
        server.server_close()
