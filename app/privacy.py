"""The server's side of differential privacy (shared/privacy.py has the math, README: Differential privacy).

dp 'client': this is where the run's guarantee is made and accounted. Each round's aggregate is a
ClippedNoisySum (shared/accumulator.py); the clip adapts to a quantile of the update norms if asked; every
committed round is one sampled Gaussian step (noise multiplier, q = clients asked / clients they were drawn from)
of the run's accountant, rebuilt from the stored rounds after a restart. A round whose step would pass the budget is
not played: the run finishes with 'privacy budget'.

dp 'sample' and 'local': each client accounts for itself (client/privacy.py) and signs the epsilon it spent
into every update; the server records it per client and round, stops asking clients whose budget is spent,
and finishes the run with 'privacy budget' once too few have budget left.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from app import strategy
from app.config import RunConfig
from app.store import Store
from shared.accumulator import Accumulator, ClippedNoisySum
from shared.errors import ConfigError
from shared.models import build_model
from shared.privacy import Accountant, next_clip, split_noise

COUNT_SHARE = 0.1  # adaptive clipping: the share of the noise budget the unclipped count gets (Andrew et al.)
BUDGET = "privacy budget"


def count_noise(noise_multiplier: float) -> float:
    """The noise multiplier of the unclipped count that leaves it COUNT_SHARE of the budget:
    (2 sigma_b)^-2 = COUNT_SHARE * sigma^-2 (shared.privacy.split_noise)."""
    return noise_multiplier / (2 * math.sqrt(COUNT_SHARE))


def delta_problem(cfg: RunConfig, registered: int) -> str | None:
    """Client-level DP protects each registered client: its delta must stay below 1 / their number."""
    if cfg.dp == "client" and registered and cfg.delta >= 1 / registered:
        return (f"client-level DP protects each of the {registered} registered clients: delta must be below "
                f"1/{registered} = {1 / registered:g}")
    return None


def check_model(cfg: RunConfig, input_shape: tuple[int, ...]) -> None:
    """dp 'sample' needs a model Opacus can train with per-example gradients (no BatchNorm, ...): refuse the run
    before any client imports Opacus to find out."""
    if cfg.dp != "sample":
        return
    from opacus.validators import ModuleValidator
    if errors := ModuleValidator.validate(build_model(cfg.model, input_shape), strict=False):
        raise ConfigError({"model": f"Opacus cannot train {cfg.model!r} with per-example gradients ({errors[0]}); "
                                    "choose a model without BatchNorm, or use --dp client"})


class RunPrivacy:
    """The privacy state of the run being played: its accountant and clip (dp 'client'), and its clients'."""

    def __init__(self, store: Store):
        self.store = store
        self.accountant = Accountant()
        self.clip = 0.0
        self._rng = np.random.default_rng()

    def start(self, run_id: str, cfg: RunConfig) -> None:
        """Pick the run up where its committed rounds left it (or fresh): accountant, clip."""
        rounds = [r["privacy"] for r in self.store.rounds(run_id, evaluated_only=False) if r.get("privacy")]
        self.accountant = Accountant(cfg.accountant, [r["event"] for r in rounds if r.get("event")])
        self.clip = rounds[-1].get("next_clip", cfg.clip_norm) if rounds else cfg.clip_norm

    def eligible(self, sessions: list[Any], cfg: RunConfig) -> list[str]:
        """The online clients that may still be asked: those whose budget is not spent."""
        if cfg.dp not in ("sample", "local"):
            return [s.client_id for s in sessions]
        return [s.client_id for s in sessions if not s.privacy.get("exhausted")
                and not (cfg.target_epsilon and s.privacy.get("epsilon", 0.0) >= cfg.target_epsilon)]

    def refuses(self, cfg: RunConfig, asked: int, online: int, eligible: int) -> str | None:
        """Why the run must finish before this round (its budget), or None."""
        if cfg.dp in ("sample", "local") and eligible < cfg.min_fit_clients <= online:
            return BUDGET  # enough clients are there, too few have budget left
        if cfg.dp != "client":
            return None
        if problem := delta_problem(cfg, self.store.client_count()):  # more clients registered since the start
            return f"{BUDGET}: {problem}"
        if cfg.target_epsilon and self.accountant.epsilon_after(self._event(cfg, asked, eligible),
                                                                cfg.delta) > cfg.target_epsilon:
            return BUDGET
        return None

    def _event(self, cfg: RunConfig, asked: int, pool: int) -> tuple[float, float, int]:
        """One round as a sampled Gaussian step. A client that is online is asked with probability asked / pool
        (pool: the online clients the round drew from), not asked / registered: offline clients are never drawn,
        so counting them would overstate the amplification."""
        return (cfg.noise_multiplier, min(1.0, asked / max(pool, 1)), 1)

    def accumulator(self, cfg: RunConfig, asked: int) -> Accumulator:
        """The round's aggregate: the strategy's, or with dp 'client' the clipped, noised sum (with adaptive
        clipping the unclipped count takes COUNT_SHARE of the noise)."""
        if cfg.dp != "client":
            return strategy.accumulator_for(cfg)
        adaptive = cfg.clip_quantile > 0
        sigma = split_noise(cfg.noise_multiplier, count_noise(cfg.noise_multiplier)) if adaptive \
            else cfg.noise_multiplier
        return ClippedNoisySum(self.clip, sigma, asked, self._rng,
                               count_noise(cfg.noise_multiplier) if adaptive else 0.0)

    def account(self, cfg: RunConfig, accumulator: Any, asked: int, pool: int,
                arrivals: list[Any]) -> dict[str, Any]:
        """After an aggregation: what the round spent, for its row (stored, and replayed on a restart)."""
        clients = {a.client_id: a.epsilon for a in arrivals if a.epsilon}
        if cfg.dp == "none":
            return {}
        if cfg.dp != "client":
            return {"mode": cfg.dp, "target": cfg.target_epsilon, "clients": clients}
        event = self._event(cfg, asked, pool)
        self.accountant.step(*event)
        used = self.clip
        unclipped = accumulator.unclipped_fraction()
        if cfg.clip_quantile:
            self.clip = next_clip(used, unclipped, cfg.clip_quantile, cfg.clip_lr)
        return {"mode": cfg.dp, "target": cfg.target_epsilon, "event": list(event), "clip": used,
                "next_clip": self.clip, "unclipped": unclipped, "epsilon": self.accountant.epsilon(cfg.delta)}


def privacy_view(rounds: list[dict[str, Any]], cfg: RunConfig) -> dict[str, Any]:
    """What a run spent, round by round (GET /api/privacy, /metrics, the dashboard's Privacy tab): the run's
    epsilon (dp 'client') and each client's (dp 'sample', 'local'), the last of each, and the budget's share."""
    run = [{"round": r["round"], **{k: r["privacy"][k] for k in ("epsilon", "clip", "unclipped")}}
           for r in rounds if r["privacy"].get("epsilon") is not None]
    clients: dict[str, list[dict[str, float]]] = {}
    for r in rounds:
        for cid, epsilon in r["privacy"].get("clients", {}).items():
            clients.setdefault(cid, []).append({"round": r["round"], "epsilon": epsilon})
    latest = {"run": run[-1]["epsilon"] if run else None,
              "clients": {cid: points[-1]["epsilon"] for cid, points in clients.items()}}
    spent = max([latest["run"] or 0.0, *latest["clients"].values()])
    return {"mode": cfg.dp, "target_epsilon": cfg.target_epsilon, "delta": cfg.delta, "accountant": cfg.accountant,
            "run": run, "clients": clients, "latest": latest,
            "budget_used": spent / cfg.target_epsilon if cfg.target_epsilon else None}
