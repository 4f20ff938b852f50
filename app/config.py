"""Server and run configuration: frozen dataclasses with commented defaults, validated once."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from shared.compression import COMPRESSIONS
from shared.datasets import DATASETS
from shared.errors import ConfigError
from shared.models import MODELS
from app.evaluation import MODES as EVALUATION_MODES
from app.secagg import MODES as SECAGG_MODES
from app.strategy import ROBUST, STRATEGIES, updates_needed
from shared.partition import PARTITION_NAMES
from shared.privacy import ACCOUNTANTS, DP_MODES


@dataclass(frozen=True)
class Setting:
    """How one run setting is checked and described: validation, the JSON Schema (/api/config/schema, the
    OpenAPI contract) and the dashboard form are made from it."""

    label: str                 # a few words, for the dashboard's form
    help: str                  # a sentence, for --help and the form's tooltip
    group: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False      # (lo, ... instead of [lo, ...
    hi_open: bool = False      # ..., hi) instead of ..., hi]
    choices: Callable[[], Sequence[str]] | None = None  # a function: plug-ins may register strategies later
    note: str = ""             # what a special value means, e.g. "0 = no cap"
    flag: str = ""             # run_server.py's flag, when it is not --<name-with-dashes>

    def meaning(self, kind: str) -> str:
        """What a valid value is, in words (error messages end with it)."""
        if self.choices is not None:
            named = ", ".join(repr(c) if c == "" else c for c in self.choices())
            return f"one of {named}" + (f" ({self.note})" if self.note else "")
        if kind == "int":
            words = f"an integer from {self.lo:.0f} to {self.hi:.0f}"
        elif self.lo_open or self.hi_open:
            words = f"a number in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        else:
            words = f"a number from {self.lo:g} to {self.hi:g}"
        return words + (f" ({self.note})" if self.note else "")

    def accepts(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices()
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def json_schema(self, kind: str) -> dict[str, Any]:
        if self.choices is not None:
            return {"type": "string", "enum": list(self.choices())}
        schema: dict[str, Any] = {"type": "integer" if kind == "int" else "number"}
        schema["exclusiveMinimum" if self.lo_open else "minimum"] = self.lo
        schema["exclusiveMaximum" if self.hi_open else "maximum"] = self.hi
        return schema


def setting(default: Any, label: str, help: str, group: str, **rule: Any) -> Any:
    """A RunConfig field and how it is checked and shown: adding a run setting is one such line."""
    return field(default=default, metadata={"setting": Setting(label, help, group, **rule)})


def _strategies() -> Sequence[str]:
    return sorted(STRATEGIES)


@dataclass(frozen=True)
class RunConfig:
    """What one training run does; editable through POST /api/config while no run is active. Each field is
    one setting(default, label, help, group, bounds or choices): run_server.py's flags, the checks, the JSON
    Schema of GET /api/config/schema and the dashboard's form are all made from these lines."""

    # data
    dataset: str = setting("fashion-mnist", "Dataset", "the server evaluates the global model on this test split",
                           "data", choices=lambda: sorted(DATASETS))
    model: str = setting("cnn", "Model", "'cnn' (McMahan CNN / CIFAR CNN by input shape), 'mlp', or a plug-in's",
                         "data", choices=lambda: sorted(MODELS))
    partition: str = setting("", "Partition", "'' = each client keeps its own --partition; else every client "
                             "re-partitions (for simulations)", "data", choices=lambda: ("",) + PARTITION_NAMES,
                             note="'' = the clients' own")
    alpha: float = setting(0.5, "Dirichlet alpha", "Dirichlet concentration when partition is 'dirichlet'", "data",
                           lo=0.001, hi=1000)
    # rounds
    num_rounds: int = setting(5, "Rounds", "stop after this many completed rounds", "rounds", lo=1, hi=100_000)
    fraction_fit: float = setting(1.0, "Fraction of clients per round", "share of connected clients asked to "
                                  "train each round", "rounds", lo=0, hi=1, lo_open=True)
    min_fit_clients: int = setting(2, "Min clients", "a round asks at least this many clients (and waits until "
                                   "that many are connected)", "rounds", lo=1, hi=10_000, flag="--min-clients")
    min_available_clients: int = setting(0, "Min available", "a round starts only when this many clients are "
                                         "connected; fraction_fit of them are asked (Flower's "
                                         "min_available_clients)", "rounds", lo=0, hi=100_000,
                                         note="0 = min_clients", flag="--min-available")
    wait_timeout: float = setting(600.0, "Wait for min available (s)", "after this long waiting for "
                                  "min_available_clients, a round starts with those connected if they are at "
                                  "least min_clients (it never starts with fewer)", "rounds", lo=0, hi=604_800,
                                  note="0 = wait as long as it takes")
    max_fit_clients: int = setting(0, "Max clients per round", "cap on clients asked per round", "rounds", lo=0,
                                   hi=10_000, note="0 = no cap", flag="--max-clients")
    quorum: float = setting(0.5, "Quorum", "at the deadline, aggregate if this share of the asked replied",
                            "rounds", lo=0, hi=1, lo_open=True)
    round_timeout: float = setting(300.0, "Round timeout (s)", "seconds from asking to the deadline (the "
                                   "default leaves room for 10 clients on 2 shared cores, each training one epoch "
                                   "of a client's default data, the whole Fashion-MNIST split, with the CNN: 1,500 "
                                   "batches, about 52 s of one core)", "rounds",
                                   lo=1, hi=86_400)
    min_updates: int = setting(0, "Close a round at N updates", "close the round as soon as this many updates "
                               "arrived (asynchronous rounds: set it below the asked count)", "rounds", lo=0,
                               hi=10_000, note="0 = wait for all asked clients")
    stragglers: str = setting("drop", "Late updates", "late updates from asked clients: 'drop' (recorded) or "
                              "'merge' (into the next aggregation with weight n / sqrt(1 + staleness))", "rounds",
                              choices=lambda: ("drop", "merge"))
    max_staleness: int = setting(2, "Max staleness (rounds)", "rounds after which a late update is simply stale",
                                 "rounds", lo=1, hi=100)
    target_accuracy: float = setting(0.0, "Target accuracy", "stop once test accuracy reaches this", "rounds",
                                     lo=0, hi=1, note="0 = off")
    eval_every: int = setting(1, "Evaluate every", "the server evaluates the global model every K rounds and after "
                              "the last", "rounds", lo=1, hi=100_000)
    evaluation: str = setting("inline", "Evaluation", "inline: the next round waits for the server's evaluation; "
                              "background: a worker thread evaluates each committed model while the next round "
                              "trains; process: the same, with the forward passes in a child process "
                              "(app/evaluation.py)", "rounds", choices=lambda: EVALUATION_MODES)
    seed: int = setting(0, "Seed", "seeds the initial model and client selection", "rounds", lo=0, hi=2**32 - 1)
    # training
    local_epochs: int = setting(1, "Local epochs", "E: local passes over each client's training split",
                                "training", lo=1, hi=100)
    lr: float = setting(0.05, "Learning rate", "client SGD learning rate", "training", lo=0, hi=10, lo_open=True)
    momentum: float = setting(0.0, "Client momentum", "client SGD momentum, buffers started afresh each round "
                              "(0 = plain SGD)", "training", lo=0, hi=1, hi_open=True)
    batch_size: int = setting(32, "Batch size", "B: client minibatch size", "training", lo=1, hi=65_536)
    max_batches: int = setting(0, "Max local batches", "cap on local batches per round", "training", lo=0,
                               hi=10_000_000, note="0 = no cap")
    compression: str = setting("none", "Update compression", "how clients encode updates "
                               "(shared/compression.py)", "training", choices=lambda: COMPRESSIONS)
    topk_ratio: float = setting(0.01, "Top-k ratio", "topk: the share of each tensor's values a client sends",
                                "training", lo=0, hi=1, lo_open=True)
    download_compression: str = setting("none", "Download compression", "int8: each new model is the last one "
                                        "plus an int8-coded step, and a client holding the last one downloads only "
                                        "the step (app/downlink.py)", "training", choices=lambda: ("none", "int8"))
    error_feedback: str = setting("on", "Error feedback", "topk: a client adds what it did not send to its next "
                                  "update (off: dropped, for ablations)", "training", choices=lambda: ("on", "off"))
    # strategy
    strategy: str = setting("fedavg", "Strategy", "how the server combines updates (app/strategy.py, and "
                            "--strategy-module plug-ins)", "strategy", choices=_strategies)
    proximal_mu: float = setting(0.0, "FedProx mu", "FedProx: clients add mu/2 * ||w - w_global||^2 (fedprox "
                                 "needs > 0)", "strategy", lo=0, hi=100)
    server_lr: float = setting(0.1, "Server learning rate", "FedOpt / FedAvgM server learning rate (eta)",
                               "strategy", lo=0, hi=100, lo_open=True)
    beta1: float = setting(0.9, "Beta 1", "FedOpt first-moment decay; FedAvgM momentum", "strategy", lo=0, hi=1,
                           hi_open=True)
    beta2: float = setting(0.99, "Beta 2", "FedAdam / FedYogi second-moment decay", "strategy", lo=0, hi=1,
                           hi_open=True)
    tau: float = setting(1e-3, "Tau", "FedOpt adaptivity (epsilon); v starts at tau^2", "strategy", lo=0, hi=1,
                         lo_open=True)
    byzantine_f: int = setting(0, "Byzantine f", "Krum / Multi-Krum / Bulyan / NNM: attackers tolerated per "
                               "round", "strategy", lo=0, hi=1000)
    multikrum_m: int = setting(0, "Multi-Krum m", "Multi-Krum: updates averaged", "strategy", lo=0, hi=10_000,
                               note="0 = n - f")
    trim_beta: float = setting(0.1, "Trimmed-mean beta", "trimmed mean: share cut from each end per coordinate",
                               "strategy", lo=0, hi=0.5, hi_open=True)
    mixing: str = setting("none", "Robust rules: mixing", "robust rules: 'nnm' first mixes each update with its "
                          "n - f nearest (Allouah et al. 2023; uses byzantine_f), for non-IID clients", "strategy",
                          choices=lambda: ("none", "nnm"))
    anomaly_z: float = setting(2.5, "Anomaly z-score", "flag updates whose norm or cosine distance to the last "
                               "step has a z-score above this", "strategy", lo=0, hi=100, lo_open=True)
    # privacy (shared/privacy.py; README: Differential privacy)
    dp: str = setting("none", "Differential privacy", "'sample': DP-SGD on each client (Opacus); 'client': "
                      "DP-FedAvg on the server (clip each update, noise their sum); 'local': each client adds "
                      "Laplace noise to its update", "privacy", choices=lambda: DP_MODES)
    target_epsilon: float = setting(0.0, "Privacy budget (epsilon)", "spend no more than this epsilon: each "
                                    "client's (sample, local) or the run's (client)", "privacy", lo=0, hi=1000,
                                    note="0 = no budget")
    delta: float = setting(1e-5, "Delta", "the delta of the (epsilon, delta) guarantee: below 1 / the number of "
                           "records protected (a client's examples; the registered clients)", "privacy", lo=0,
                           hi=0.1, lo_open=True)
    noise_multiplier: float = setting(1.0, "Noise multiplier", "sigma: Gaussian noise std over the clip (sample, "
                                      "client)", "privacy", lo=0, hi=100, lo_open=True)
    max_grad_norm: float = setting(1.0, "Per-example clip", "sample: each example's gradient clipped to this L2 "
                                   "norm", "privacy", lo=0, hi=10_000, lo_open=True)
    clip_norm: float = setting(1.0, "Update clip", "client: each update clipped to this L2 norm (the first one, "
                               "when adaptive); local: to this L1 norm", "privacy", lo=0, hi=1e6, lo_open=True)
    clip_quantile: float = setting(0.0, "Adaptive clip quantile", "client: move the clip towards this quantile of "
                                   "the update norms (Andrew et al. 2021)", "privacy", lo=0, hi=1, hi_open=True,
                                   note="0 = a fixed clip")
    clip_lr: float = setting(0.2, "Clip learning rate", "client, adaptive: the clip's geometric learning rate",
                             "privacy", lo=0, hi=10, lo_open=True)
    accountant: str = setting("rdp", "Accountant", "sample, client: Opacus' RDP or PRV accountant", "privacy",
                              choices=lambda: ACCOUNTANTS)
    local_epsilon: float = setting(1.0, "Local epsilon per round", "local: the pure epsilon each update spends",
                                   "privacy", lo=0, hi=100, lo_open=True)

    # secure aggregation (app/secagg.py; README: Secure aggregation)
    secure_aggregation: str = setting("none", "Secure aggregation", "'secagg+': the server learns only the sum "
                                      "of the round's updates (masked; SecAgg+ with dropout recovery)", "privacy",
                                      choices=lambda: SECAGG_MODES)
    secagg_clip: float = setting(1.0, "SecAgg range", "secagg+: each coordinate of an update is clipped to "
                                 "[-this, this] before it is quantised", "privacy", lo=0, hi=1e6, lo_open=True)
    secagg_threshold: float = setting(0.5, "SecAgg threshold", "secagg+: shares needed to rebuild a client's "
                                      "secrets, as a share of its neighbourhood (always more than half)", "privacy",
                                      lo=0, hi=1, lo_open=True)
    secagg_neighbours: int = setting(0, "SecAgg neighbours", "secagg+: each client's neighbours k (n - 1 or more = "
                                     "plain SecAgg)", "privacy", lo=0, hi=10_000, note="0 = 6 log2 n")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SETTINGS: dict[str, tuple[str, Setting]] = {f.name: (str(f.type), f.metadata["setting"])
                                            for f in dataclasses.fields(RunConfig)}  # name -> (type, setting)


def config_schema() -> dict[str, Any]:
    """The run configuration as a JSON Schema: each field's type, bounds or choices, default, help, group."""
    defaults = RunConfig()
    return {"type": "object", "additionalProperties": False, "properties": {
        name: {**setting.json_schema(kind), "default": getattr(defaults, name), "title": setting.label,
               "description": setting.help + (f" ({setting.note})" if setting.note else ""), "x-group": setting.group}
        for name, (kind, setting) in SETTINGS.items()}}


@dataclass(frozen=True)
class ServerConfig:
    """How the server process runs; fixed for its lifetime (read from argv/env by run_server.py)."""

    state_dir: str = "state"            # SQLite database + model checkpoints live here
    host: str = "127.0.0.1"
    port: int = 5000
    admin_token: str = ""               # required for every request that changes something
    enrollment_token: str = ""          # clients present it when they register
    data_dir: str | None = None         # dataset root; None = $MESHFED_DATA_DIR or ./data
    eval_limit: int = 0                 # evaluate on the first N test samples; 0 = the whole split
    max_update_bytes: int = 32 << 20    # an update body larger than this is refused ('too_large')
    resume: bool = True                 # on start, resume a run that was active when we died
    run: RunConfig = RunConfig()        # the run configuration used when no run is stored
    # Scale-out (README "Several server processes"): one leader runs the round loop and serves the
    # clients; followers serve dashboards only. They share Socket.IO rooms through message_queue.
    role: str = "leader"                # 'leader', 'follower' or 'edge' (app/edge.py: holds clients, pre-aggregates)
    leader_url: str | None = None       # followers and edges: the leader's address (http://host:port)
    edge_id: str | None = None          # an edge's name in the tier; None = host:port
    message_queue: str | None = None    # e.g. redis://127.0.0.1:6379/0; None = a single process
    async_mode: str = "threading"       # Flask-SocketIO's; 'gevent' for edges (run_server.py --wsgi gevent)
    mlflow_uri: str | None = None       # MLflow tracking URI (app/tracking.py); None = no tracking
    mlflow_artifacts: str | None = None  # where a local MLflow store keeps artifacts (the model); None = its server's
    # Security (README "Security model").
    allowed_origins: tuple[str, ...] = ()  # browser origins that may open a Socket.IO connection; () = only
                                           # the server's own (as the browser reached it, through a proxy too)
    proxies: int = 0                    # reverse proxies in front whose X-Forwarded-For/-Proto/-Host to trust
                                        # (1 behind the shipped nginx): the client's address and https
    rate_limits: tuple[tuple[str, str], ...] = ()  # (rule, limit) overrides of app/ratelimit.DEFAULT_RULES


def _coerce(kind: str, value: Any) -> Any:
    """`value` as a `kind` ('int', 'float', 'str'); numbers may come as text (the dashboard's form sends text)."""
    if isinstance(value, bool) or isinstance(value, (dict, list)) or value is None:
        raise TypeError(kind)
    if kind == "str":
        if not isinstance(value, str):
            raise TypeError(kind)
        return value
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(value)
    if kind == "int":
        if number != int(number):
            raise ValueError(value)
        return int(number)
    return number


def update_run_config(base: RunConfig, changes: dict[str, Any]) -> RunConfig:
    """base with `changes` applied, or ConfigError listing every bad field and what it must be."""
    if not isinstance(changes, dict):
        raise ConfigError({"_": "expected a JSON object of field: value"})
    errors: dict[str, str] = {}
    clean: dict[str, Any] = {}
    for name, value in changes.items():
        if name not in SETTINGS:
            errors[name] = f"unknown field; known fields: {', '.join(SETTINGS)}"
            continue
        kind, rule = SETTINGS[name]
        try:
            coerced = _coerce(kind, value)
        except (TypeError, ValueError, OverflowError):
            errors[name] = f"must be {rule.meaning(kind)}"
            continue
        if not rule.accepts(coerced):
            errors[name] = f"must be {rule.meaning(kind)}"
        clean[name] = coerced
    if errors:
        raise ConfigError(errors)
    result = dataclasses.replace(base, **clean)
    if result.max_fit_clients and result.max_fit_clients < result.min_fit_clients:
        raise ConfigError({"max_fit_clients": "must be 0 or at least min_fit_clients"})
    if result.strategy == "fedprox" and result.proximal_mu <= 0:
        raise ConfigError({"proximal_mu": "fedprox needs proximal_mu > 0 (e.g. 0.01)"})
    if result.mixing == "nnm":
        if result.strategy not in ROBUST:
            raise ConfigError({"mixing": f"nnm mixes updates before a robust rule ({', '.join(ROBUST)}); "
                                         f"{result.strategy} does not take it"})
        if not 0 < 2 * result.byzantine_f < result.min_fit_clients:
            raise ConfigError({"byzantine_f": "nnm needs byzantine_f (attackers to tolerate) with 1 <= byzantine_f < "
                                              "min_fit_clients / 2"})
    if result.dp == "client" and not STRATEGIES[result.strategy].streams:
        raise ConfigError({"dp": f"client-level DP noises the sum of clipped updates; {result.strategy} needs every "
                                 "update itself: choose fedavg, fedavgm or a FedOpt strategy"})
    if result.dp == "client" and result.stragglers == "merge":
        raise ConfigError({"stragglers": "client-level DP accounts one clipped update per asked client a round; "
                                         "late updates cannot be merged: use 'drop'"})
    if result.dp == "sample" and result.strategy == "fedprox":
        raise ConfigError({"strategy": "DP-SGD clips each example's gradient; FedProx's proximal term is not an "
                                       "example's: use fedavg (or a FedOpt strategy) with dp 'sample'"})
    if result.secure_aggregation != "none":
        secure_rules(result)
    needed = updates_needed(result)
    if needed > result.min_fit_clients:
        raise ConfigError({"min_fit_clients": f"{result.strategy} with byzantine_f={result.byzantine_f} needs "
                                              f"at least {needed} clients per round (n > 2f + 2 for Krum, "
                                              f"n >= 4f + 3 for Bulyan)"})
    return result


def secure_rules(cfg: RunConfig) -> None:
    """What secure aggregation cannot be combined with, and why (ConfigError naming the setting)."""
    if not STRATEGIES[cfg.strategy].streams:
        raise ConfigError({"secure_aggregation": f"{cfg.strategy} needs every update itself; secure aggregation "
                                                 "reveals only their sum: choose fedavg, fedprox, fedavgm or a "
                                                 "FedOpt strategy"})
    if cfg.dp == "client":
        raise ConfigError({"secure_aggregation": "client-level DP clips each update on the server, which secure "
                                                 "aggregation never sees: use dp 'sample' or 'local' with it"})
    if cfg.compression != "none":
        raise ConfigError({"compression": "secure aggregation sends each update as 32-bit ring integers; "
                                          "use compression 'none' with it"})
    if cfg.stragglers == "merge":
        raise ConfigError({"stragglers": "a late masked update cannot be unmasked alone: use 'drop' with secure "
                                         "aggregation"})
    if cfg.min_updates:
        raise ConfigError({"min_updates": "secure aggregation waits for every input it can unmask: use 0"})
