"""Run the meshfed server: python run_server.py --dataset fashion-mnist --num-rounds 5 --start"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from app.config import SETTINGS, RunConfig, ServerConfig, Setting, update_run_config
from app.ratelimit import DEFAULT_RULES, parse_rules
from app.tokens import load_or_create
from app.tracking import DEFAULT_DIR as DEFAULT_MLFLOW_DIR
from shared.errors import ConfigError
from shared.cli import HelpFormatter
from shared.fileio import read_secret
from shared.log import redact, setup_logging

if TYPE_CHECKING:
    from flask import Flask

# Flask, gunicorn and torch are imported where they are used, after the flags are parsed: --help and a
# mistyped flag answer at once (tests/test_entry_points.py checks that they load no torch).


def run_flags() -> list[tuple[str, str, str, Setting]]:
    """(field, flag, kind, setting) of every run setting: the flags are made from RunConfig's fields."""
    return [(name, setting.flag or "--" + name.replace("_", "-"), kind, setting)
            for name, (kind, setting) in SETTINGS.items()]


def build_parser() -> argparse.ArgumentParser:
    """Every flag, with its help and default (--help); checks that span flags are in parse_args."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=5000, help="port for clients, dashboards and the API")
    p.add_argument("--state-dir", default="state", help="SQLite + checkpoints; restart on it to resume")
    p.add_argument("--data-dir", default=None, help="dataset root (default $MESHFED_DATA_DIR or ./data)")
    p.add_argument("--admin-token-file", default=None,
                   help="file holding the admin token (else $MESHFED_ADMIN_TOKEN, else state-dir/tokens.json, "
                        "else one is generated, stored there and printed once)")
    p.add_argument("--enrollment-token-file", default=None,
                   help="file holding the token clients register with (else $MESHFED_ENROLLMENT_TOKEN, else "
                        "state-dir/tokens.json, else generated like the admin token)")
    p.add_argument("--admin-token", default=None, help=argparse.SUPPRESS)       # visible in ps: use the file
    p.add_argument("--enrollment-token", default=None, help=argparse.SUPPRESS)  # or the environment instead
    run = p.add_argument_group("run configuration (also POST /api/config and the dashboard; app/config.py)")
    for name, flag, kind, setting in run_flags():
        run.add_argument(flag, dest=name, type={"int": int, "float": float, "str": str}[kind],
                         default=getattr(RunConfig(), name), metavar=kind.upper(),
                         help=f"{setting.help}; {setting.meaning(kind)} (default %(default)r)")
    plugins = p.add_argument_group("plug-ins (README: Plug-ins)")
    plugins.add_argument("--strategy-module", action="append", default=[], metavar="MODULE",
                         help="import a module that registers strategies (app.strategy.register); repeatable")
    plugins.add_argument("--model-module", action="append", default=[], metavar="MODULE",
                         help="import a module that registers models (shared.models.register_model); repeatable")
    plugins.add_argument("--dataset-module", action="append", default=[], metavar="MODULE",
                         help="import a module that registers datasets (shared.datasets.register_dataset)")
    p.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N test samples (0 = all)")
    p.add_argument("--max-update-mb", type=float, default=32.0, help="largest update body accepted")
    p.add_argument("--start", action="store_true", help="start a run at once (else: POST /api/start)")
    p.add_argument("--no-resume", action="store_true", help="do not resume a run that was active at a crash")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="PyTorch threads for evaluation (0 = one per core: the round's training is over by then)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("--log-file", default=None, help="also log to this file")
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one object per line")
    p.add_argument("--role", default="leader", choices=["leader", "follower", "edge"],
                   help="leader: runs the round loop and serves clients; follower: serves dashboards only; edge: "
                        "serves clients and pre-aggregates their updates for the leader (README \"Edges\")")
    p.add_argument("--leader-url", default=None,
                   help="followers and edges: the leader's address, e.g. http://server:5000")
    p.add_argument("--edge-id", default=None, help="edges: this edge's name in the tier (default host:port)")
    p.add_argument("--message-queue", default=os.environ.get("MESHFED_MESSAGE_QUEUE"),
                   help="redis://host:6379/0 shared by every server process (default $MESHFED_MESSAGE_QUEUE)")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin (https://host[:port]) allowed to open the dashboard's Socket.IO; "
                        "repeatable; default: only the server's own origin, as the browser reached it (through a "
                        "proxy too)")
    p.add_argument("--proxies", type=int, default=0,
                   help="reverse proxies in front whose X-Forwarded-For/-Proto/-Host to trust (1 behind nginx)")
    p.add_argument("--rate-limit", action="append", default=[], metavar="RULE=LIMIT",
                   help="override a rate limit, e.g. update-per-client=120/minute or login-per-address=off; "
                        f"rules: {', '.join(DEFAULT_RULES)}")
    p.add_argument("--mlflow", action="store_true",
                   help=f"track each run in MLflow, in ./{DEFAULT_MLFLOW_DIR} (a SQLite store; no server needed)")
    p.add_argument("--mlflow-uri", default=None, metavar="URI",
                   help="track each run in this MLflow tracking server or store, e.g. http://mlflow:5000")
    p.add_argument("--wsgi", default="werkzeug", choices=["werkzeug", "gunicorn", "gevent"],
                   help="werkzeug: development server; gunicorn: production (1 worker, --threads threads); gevent: "
                        "gunicorn with gevent's greenlets, for --role edge (a greenlet per client, not a thread)")
    p.add_argument("--threads", type=int, default=100,
                   help="gunicorn threads; each connected client or browser holds one (gevent: the most "
                        "connections at once)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.torch_threads < 0:
        p.error("--torch-threads must be 0 (one per core) or a number of threads")
    if args.role != "leader" and not (args.leader_url and args.message_queue):
        p.error(f"--role {args.role} needs --leader-url and --message-queue")
    if args.role != "leader" and args.start:
        p.error("--start is for the leader; a follower forwards Start from its dashboards")
    if args.wsgi == "gevent" and args.role != "edge":
        p.error("--wsgi gevent is for --role edge: the leader's torch work (evaluation, aggregation) would stall "
                "every connection of a cooperative server; use --wsgi gunicorn")
    if args.wsgi == "gevent" and importlib.util.find_spec("gevent") is None:
        p.error("--wsgi gevent needs gevent: pip install -r requirements.txt")
    if args.proxies < 0:
        p.error("--proxies must be 0 (clients connect directly) or the number of proxies in front")
    for rule in args.rate_limit:
        if "=" not in rule:
            p.error(f"--rate-limit {rule!r}: write RULE=LIMIT, e.g. update-per-client=120/minute")
    try:
        args.admin_token = _token(args.admin_token, args.admin_token_file, "MESHFED_ADMIN_TOKEN")
        args.enrollment_token = _token(args.enrollment_token, args.enrollment_token_file, "MESHFED_ENROLLMENT_TOKEN")
    except ValueError as exc:
        p.error(str(exc))
    return args


def _token(flag: str | None, path: str | None, env: str) -> str | None:
    """A token from its flag, its file, or the environment (None: the state dir's, or a new one)."""
    if flag:
        print(f"warning: a token on the command line is visible to every user in `ps`; use a token file "
              f"or ${env}", file=sys.stderr)
        return flag
    return read_secret(path) if path else os.environ.get(env) or None


def build_config(args: argparse.Namespace) -> ServerConfig:
    """The server's configuration from its flags; ConfigError names each bad run flag."""
    for module in args.strategy_module + args.model_module + args.dataset_module:
        importlib.import_module(module)  # plug-ins register themselves before the settings are checked
    flags = {name: flag for name, flag, _, _ in run_flags()}
    try:
        run = update_run_config(RunConfig(), {name: getattr(args, name) for name in flags})
    except ConfigError as exc:
        raise ConfigError({flags.get(name, name): why for name, why in exc.fields.items()}) from None
    mlflow_uri = mlflow_artifacts = None
    if args.mlflow or args.mlflow_uri:
        if importlib.util.find_spec("mlflow") is None:
            raise ConfigError({"--mlflow": "needs MLflow: pip install -r requirements.txt"})
        if args.role != "leader":
            raise ConfigError({"--mlflow": "is for the leader, which plays the rounds"})
        from app.tracking import local_uri
        mlflow_uri = args.mlflow_uri or local_uri(DEFAULT_MLFLOW_DIR)
        mlflow_artifacts = None if args.mlflow_uri else str(Path(DEFAULT_MLFLOW_DIR, "artifacts").resolve())
    tokens = args.tokens = load_or_create(args.state_dir, args.admin_token, args.enrollment_token)
    return ServerConfig(
        state_dir=args.state_dir, host=args.host, port=args.port, data_dir=args.data_dir,
        admin_token=tokens.admin, enrollment_token=tokens.enrollment,
        eval_limit=args.eval_limit, max_update_bytes=int(args.max_update_mb * (1 << 20)),
        resume=not args.no_resume, run=run, role=args.role, leader_url=args.leader_url, edge_id=args.edge_id,
        message_queue=args.message_queue, mlflow_uri=mlflow_uri, mlflow_artifacts=mlflow_artifacts,
        allowed_origins=tuple(args.allowed_origin), proxies=args.proxies,
        async_mode="gevent" if args.wsgi == "gevent" else "threading",
        rate_limits=tuple(tuple(rule.split("=", 1)) for rule in args.rate_limit))


def build_app(args: argparse.Namespace, config: ServerConfig) -> Flask:
    """The app with its background work started: feed, and a resumed or started run (leader)."""
    from app import create_app
    try:
        app = create_app(config)
    except RuntimeError as exc:  # e.g. another leader holds the lock
        raise SystemExit(f"meshfed server: {exc}")
    meshfed = app.extensions["meshfed"]
    meshfed.start_background()
    if config.role == "leader":
        resumed = config.resume and meshfed.runs.resume_if_interrupted()
        if args.start and not resumed:
            meshfed.runs.start()
    return app


def announce(args: argparse.Namespace, config: ServerConfig) -> None:
    """Say where the server is. A token is printed only when it was generated just now (and stored)."""
    url, tokens = f"http://{config.host}:{config.port}/", args.tokens
    new = {f"{name}_token": getattr(tokens, name) for name in tokens.created}
    admin = tokens.source("admin")
    dashboard = f"{url}?token={tokens.admin}" if admin == "new" else \
        f"{url} (log in with the admin token {'you gave' if admin == 'given' else 'kept in ' + admin})"
    if args.log_format == "json":  # one object, like every other line of a JSON log
        print(json.dumps({"message": "meshfed server started", "role": config.role, "wsgi": args.wsgi, "url": url,
                          "dashboard": dashboard, **new}), flush=True)
        return
    lines = [f"meshfed server ({config.role}, {args.wsgi}) on {url}", f"  dashboard:        {dashboard}"]
    lines += [f"  {name.replace('_', ' ') + ':':17} {token}" for name, token in new.items()]
    if new:
        lines.append(f"  (new, printed this once; kept in {tokens.path}, mode 0600)")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_file, args.log_format)
    if args.torch_threads > 0:  # else PyTorch's default, a thread per core
        import torch
        torch.set_num_threads(args.torch_threads)
    try:
        config = build_config(args)
        parse_rules(dict(config.rate_limits))
    except (ValueError, ConfigError) as exc:  # a bad flag value, an unreadable tokens.json
        raise SystemExit(f"meshfed server: {exc}")
    redact(config.admin_token, config.enrollment_token)
    announce(args, config)
    from app import wsgi
    if args.wsgi in ("gunicorn", "gevent"):
        worker = "gevent" if args.wsgi == "gevent" else "gthread"
        wsgi.Gunicorn(lambda: build_app(args, config), config, args.threads, args.log_format == "json",
                      worker).run()
        return
    app = build_app(args, config)
    # SIGTERM (docker stop, kill) exits like Ctrl-C, so exit handlers run (the leader lock is released)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    wsgi.run_werkzeug(app, config.host, config.port)


if __name__ == "__main__":
    main()
