"""Run a meshfed client: python run_client.py --client-id c0 --server-address http://127.0.0.1:5000 ..."""
from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import importlib
import logging
import multiprocessing
import os
import re
import socket
import signal
import sys
import threading
from pathlib import Path

from client.behaviour import Behaviour
from client.config import DataConfig, NodeConfig
from app.config import RunConfig
from mesh.config import MeshConfig, trust_path
from shared import crypto
from shared.cluster import die_with_parent
from shared.errors import DatasetNotFound
from shared.cli import HelpFormatter
from shared.fileio import read_secret
from shared.log import redact, setup_logging
from shared.partition import PARTITION_NAMES


# torch, the trainer and the node are imported once the flags are parsed: --help and a mistyped flag answer at
# once (tests/test_entry_points.py checks that they load no torch)
D, B, M = DataConfig(), Behaviour(), MeshConfig()  # the defaults are the dataclasses' own


def build_parser() -> argparse.ArgumentParser:
    """Every flag, with its help and default (--help); checks that span flags are in parse_args."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--client-id", default=os.environ.get("MESHFED_CLIENT_ID") or socket.gethostname(),
                   help="default $MESHFED_CLIENT_ID, else the host name (one per container)")
    p.add_argument("--server-address", default="http://127.0.0.1:5000", help="the server (or nginx in front of it)")
    p.add_argument("--dataset", default=D.dataset, help="mnist | fashion-mnist | cifar10 | synthetic, or a plug-in's")
    p.add_argument("--data-dir", default=None, help="dataset root (default $MESHFED_DATA_DIR or ./data)")
    p.add_argument("--model", default=RunConfig.model, help="cnn | mlp, or a plug-in's (must match the server's)")
    p.add_argument("--model-module", action="append", default=[], metavar="MODULE",
                   help="import a module that registers models (as the server does); repeatable")
    p.add_argument("--dataset-module", action="append", default=[], metavar="MODULE",
                   help="import a module that registers datasets (as the server does); repeatable")
    p.add_argument("--partition", default=D.partition, choices=list(PARTITION_NAMES), help="how the dataset is cut")
    p.add_argument("--alpha", type=float, default=D.alpha, help="Dirichlet concentration")
    p.add_argument("--num-clients", type=int, default=D.num_clients, help="number of partitions")
    p.add_argument("--client-index", type=int, default=D.client_index,
                   help="our partition, 0-based; -1 = derived from the client id (scaled containers: a StatefulSet "
                        "pod's ordinal, else a hash)")
    p.add_argument("--seed", type=int, default=D.seed, help="partition seed (same on every client)")
    p.add_argument("--max-samples", type=int, default=D.max_samples, help="use at most N of our samples (0 = all)")
    p.add_argument("--holdout", type=float, default=D.holdout, help="share of our samples held out for local eval")
    p.add_argument("--batch-size", type=int, default=None, help="override the server's batch size")
    p.add_argument("--lr", type=float, default=None, help="override the server's learning rate")
    p.add_argument("--local-epochs", type=int, default=None, help="override the server's local epochs")
    p.add_argument("--attack", default="", choices=["", "sign_flip", "scale", "gaussian", "label_flip"],
                   help="simulate a Byzantine client (tests, demos)")
    p.add_argument("--attack-scale", type=float, default=B.attack_scale, help="sign_flip/scale factor, gaussian std")
    p.add_argument("--delay", type=float, default=B.delay, help="seconds to wait before posting each update")
    p.add_argument("--dropout-prob", type=float, default=B.dropout_prob, help="chance of skipping a round")
    p.add_argument("--slowdown", type=float, default=B.slowdown, help="> 1: do only 1/slowdown of the local work")
    p.add_argument("--ca-cert", default=None, help="CA certificate that signed the server's (or nginx's) TLS cert")
    p.add_argument("--key-dir", default=NodeConfig.key_dir, help="RSA key directory (key file mode 0600)")
    p.add_argument("--enrollment-token-file", default=None,
                   help="file holding the server's enrollment token (else $MESHFED_ENROLLMENT_TOKEN; the server "
                        "keeps it in its state dir's tokens.json)")
    p.add_argument("--enrollment-token", default=None, help=argparse.SUPPRESS)  # visible in ps: use the file
    p.add_argument("--torch-threads", type=int, default=1, help="PyTorch threads (1 when several share a CPU)")
    p.add_argument("--local-clients", type=int, default=1, metavar="N",
                   help="run N clients on this host, each its own process forked after one import of torch "
                        "and one decoding of the training split: "
                        "ids <client-id>-0..N-1, partitions client-index..client-index+N-1, log files "
                        "<log-file stem>-k, mesh ports mesh-port+k")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("--log-file", default=None, help="also log to this file")
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one object per line")
    p.add_argument("--enable-mesh", action="store_true",
                   help="when the server is unreachable, keep training in a zeroconf-discovered P2P mesh")
    p.add_argument("--mesh-peers", default=M.static_peers, help="host:port,... of peers (networks without multicast)")
    p.add_argument("--mesh-host", default=M.host, help="address peers reach this client's mesh endpoint on")
    p.add_argument("--mesh-port", type=int, default=M.port, help="mesh endpoint port (0 = any free port)")
    p.add_argument("--mesh-after", type=float, default=M.after, help="seconds without the server before mesh mode")
    p.add_argument("--mesh-interval", type=float, default=M.interval, help="seconds between gossip steps")
    p.add_argument("--mesh-fanout", type=int, default=M.fanout, help="peers contacted per gossip step")
    p.add_argument("--mesh-batches", type=int, default=M.local_batches, help="local batches trained per gossip step")
    p.add_argument("--mesh-interfaces", default="",
                   help="zeroconf interfaces, comma-separated (e.g. 127.0.0.1); default: zeroconf's choice")
    p.add_argument("--show-fingerprint", action="store_true",
                   help="print this client's key fingerprint as a QR code (also <key-dir>/<id>-qr/) and exit")
    p.add_argument("--confirm-peer", default=None, metavar="FINGERPRINT",
                   help="trust a mesh peer that is not on the server's roster, after comparing its QR code; exit")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.local_clients < 1:
        p.error("--local-clients must be at least 1")
    args.log_tag = ""  # set for each of --local-clients N, whose logs share one stderr
    return args


def mesh_config(args: argparse.Namespace) -> MeshConfig | None:
    if not args.enable_mesh:
        return None
    return MeshConfig(host=args.mesh_host, port=args.mesh_port, after=args.mesh_after, interval=args.mesh_interval,
                      fanout=args.mesh_fanout, local_batches=args.mesh_batches, static_peers=args.mesh_peers,
                      interfaces=tuple(filter(None, args.mesh_interfaces.split(","))))


def operator_command(args: argparse.Namespace) -> int:
    """--show-fingerprint / --confirm-peer: work on the key directory only, no server needed."""
    from mesh.trust import Trust, fingerprint_qr
    if args.show_fingerprint:
        key = crypto.load_or_create_key(args.key_dir, args.client_id)
        fingerprint = crypto.fingerprint(crypto.public_pem(key))
        out = Path(args.key_dir) / f"{args.client_id}-qr"
        print(fingerprint_qr(fingerprint, out))
        print(f"{args.client_id}: {fingerprint}\n(QR code also in {out}/fingerprint.png and .svg)")
        return 0
    if not re.fullmatch(r"SHA256(:[0-9a-f]{4}){16}", args.confirm_peer):
        print(f"run_client.py: --confirm-peer expects a fingerprint like SHA256:1a2b:...(16 groups), "
              f"not {args.confirm_peer!r}", file=sys.stderr)
        return 2
    Trust(trust_path(args.key_dir, args.client_id)).confirm(args.confirm_peer)
    print(f"{args.client_id} now trusts {args.confirm_peer} in the mesh")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for module in args.model_module + args.dataset_module:
        importlib.import_module(module)  # plug-ins register their models and datasets (before any fork)
    operator = args.show_fingerprint or args.confirm_peer
    if args.enrollment_token:
        print("warning: a token on the command line is visible to every user in `ps`; use "
              "--enrollment-token-file or $MESHFED_ENROLLMENT_TOKEN", file=sys.stderr)
    elif args.enrollment_token_file:
        try:
            args.enrollment_token = read_secret(args.enrollment_token_file)
        except ValueError as exc:
            sys.exit(f"error: --enrollment-token-file: {exc}")
    else:
        args.enrollment_token = os.environ.get("MESHFED_ENROLLMENT_TOKEN")
    if not (operator or args.enrollment_token):
        sys.exit("error: pass --enrollment-token-file (the server keeps its token in state/tokens.json) or set "
                 "MESHFED_ENROLLMENT_TOKEN")
    if args.local_clients > 1 and not operator:
        return run_local_clients(args)
    return run(args)


def partition_index(client_id: str, num_clients: int) -> int:
    """--client-index -1: a Kubernetes StatefulSet pod's ordinal (meshfed-client-3 -> 3: one partition each), else
    a hash of the id (compose replicas, named by container id: two may share a partition)."""
    ordinal = re.search(r"-(\d+)$", client_id)
    if ordinal and int(ordinal.group(1)) < num_clients:
        return int(ordinal.group(1))
    return int(hashlib.sha256(client_id.encode()).hexdigest(), 16) % num_clients


def run(args: argparse.Namespace) -> int:
    """One client, in this process, until SIGTERM/SIGINT."""
    setup_logging(args.log_level, args.log_file, args.log_format, tag=args.log_tag)
    redact(args.enrollment_token or "")
    if args.show_fingerprint or args.confirm_peer:
        return operator_command(args)
    import torch

    from client.node import Node
    from client.trainer import LocalTrainer
    torch.set_num_threads(args.torch_threads)
    if args.client_index < 0:  # replicas of one service share their flags: spread them by id
        args.client_index = partition_index(args.client_id, args.num_clients)
    trainer = LocalTrainer(DataConfig(
        dataset=args.dataset, data_dir=args.data_dir, partition=args.partition, alpha=args.alpha,
        num_clients=args.num_clients, client_index=args.client_index, seed=args.seed,
        max_samples=args.max_samples, holdout=args.holdout,
        flip_labels=args.attack == "label_flip"), model_name=args.model)
    behaviour = Behaviour(attack=args.attack, attack_scale=args.attack_scale, delay=args.delay,
                          dropout_prob=args.dropout_prob, slowdown=args.slowdown, seed=args.client_index)
    node = Node(NodeConfig(client_id=args.client_id, server_address=args.server_address.rstrip("/"),
                           enrollment_token=args.enrollment_token, key_dir=args.key_dir,
                           local_epochs=args.local_epochs, lr=args.lr, batch_size=args.batch_size,
                           ca_cert=args.ca_cert, mesh=mesh_config(args)), trainer,
                behaviour)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return node.run(stop)


def local_client_args(args: argparse.Namespace, k: int) -> argparse.Namespace:
    """The flags of the k-th of --local-clients N: its own id, partition, log file and mesh port."""
    child = copy.copy(args)
    child.local_clients = 1
    child.client_id = child.log_tag = f"{args.client_id}-{k}"
    if args.client_index >= 0:  # -1 stays -1: each derives its partition from its own id
        child.client_index = args.client_index + k
        if child.client_index >= args.num_clients:
            sys.exit(f"error: --client-index {args.client_index} + --local-clients {args.local_clients} "
                     f"exceeds --num-clients {args.num_clients}")
    if args.log_file:
        log_file = Path(args.log_file)
        child.log_file = str(log_file.with_name(f"{log_file.stem}-{k}{log_file.suffix}"))
    if args.mesh_port:
        child.mesh_port = args.mesh_port + k
    return child


def _local_client(args: argparse.Namespace, parent: int) -> None:
    """A forked client: dies with its launcher (Linux), then runs like `run_client.py` would."""
    die_with_parent()  # not Linux: a launcher killed by SIGKILL leaves its clients running
    if os.getppid() != parent:  # the launcher died before prctl took effect
        sys.exit(0)
    sys.exit(run(args))


def run_local_clients(args: argparse.Namespace) -> int:
    """--local-clients N: fork N client processes from this one, which has imported torch and meshfed and
    decoded the training split once, so they start in a fraction of N separate starts' CPU time and share
    the imported pages (each client keeps its own partition of the split and drops the rest).
    Each is a whole client (own id, key, partition, connection); SIGTERM/SIGINT stop them all.
    Returns the worst exit code."""
    setup_logging(args.log_level, args.log_file, args.log_format)  # the clients log to <stem>-k
    log = logging.getLogger("meshfed.launcher")
    children = [local_client_args(args, k) for k in range(args.local_clients)]  # validates before forking
    from client.trainer import drop_preloaded, preload_split
    try:  # decoded once here, not once per client; each client keeps only its partition of it
        preload_split(args.dataset, args.data_dir)
    except DatasetNotFound as exc:
        sys.exit(f"error: {exc}")
    fork = multiprocessing.get_context("fork")  # nothing here has started a torch thread pool yet
    gc.freeze()  # the imported objects: the clients' collections skip them, so their pages stay shared
    procs = [fork.Process(target=_local_client, args=(child, os.getpid()), name=child.client_id)
             for child in children]
    for proc in procs:
        proc.start()
    drop_preloaded()  # the launcher trains nothing
    log.info("started %s", ", ".join(f"{p.name} (pid {p.pid})" for p in procs))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    running = list(procs)
    while running and not stop.wait(0.2):
        for proc in [p for p in running if not p.is_alive()]:
            running.remove(proc)
            log.info("%s (pid %d) exited with code %s", proc.name, proc.pid, proc.exitcode)
    for proc in running:
        proc.terminate()
    for proc in running:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return max(abs(p.exitcode or 0) for p in procs)


if __name__ == "__main__":
    sys.exit(main())
