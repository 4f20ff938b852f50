"""Operations endpoints: /healthz (liveness), /readyz (readiness) and /metrics (Prometheus text).

Metrics are computed at scrape time from the store and the runs (a custom collector), so counters
survive restarts; only the byte counters live in memory.
"""
from __future__ import annotations

import threading
from typing import Any, Iterator

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from app.privacy import privacy_view

bp = Blueprint("ops", __name__)


class Traffic:
    """Bytes moved over HTTP: model downloads out (whole models, or coded steps), update uploads in."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes_in = 0
        self.bytes_out = 0
        self.delta_bytes_out = 0  # of bytes_out: coded steps (download_compression int8)

    def add(self, received: int = 0, sent: int = 0, delta: bool = False) -> None:
        with self._lock:
            self.bytes_in += received
            self.bytes_out += sent
            self.delta_bytes_out += sent if delta else 0


class MeshfedCollector:
    """Yields meshfed's metrics from the current state at each scrape."""

    def __init__(self, meshfed: Any):
        self.meshfed = meshfed

    def collect(self) -> Iterator[Any]:
        runs, store = self.meshfed.runs, self.meshfed.store
        status = runs.status()
        rounds = store.rounds(runs.run_id) if runs.run_id else []
        yield CounterMetricFamily("meshfed_rounds_completed", "Rounds completed in the current run",
                                  value=len(rounds))
        yield GaugeMetricFamily("meshfed_round", "Round being played or last completed", value=status["round"])
        evaluated = [r for r in rounds if r["accuracy"] is not None]  # eval_every skips rounds
        if evaluated:
            yield GaugeMetricFamily("meshfed_accuracy", "Test accuracy of the newest evaluated global model",
                                    value=evaluated[-1]["accuracy"])
            yield GaugeMetricFamily("meshfed_loss", "Test loss of the newest evaluated global model",
                                    value=evaluated[-1]["loss"])
        if rounds:
            yield GaugeMetricFamily("meshfed_round_duration_seconds", "Wall time of the last round",
                                    value=rounds[-1]["seconds"])
        yield GaugeMetricFamily("meshfed_clients_connected", "Clients connected on /fl",
                                value=self.meshfed.registry.count())
        yield GaugeMetricFamily("meshfed_run_active", "1 while a run is active", value=int(status["active"]))
        self.meshfed.rounds.refusals.flush()
        clients = store.clients()
        yield CounterMetricFamily("meshfed_updates_accepted", "Updates accepted",
                                  value=sum(c["accepted"] for c in clients))
        refused = CounterMetricFamily("meshfed_updates_refused", "Refused requests, by reason and by whether the "
                                      "sender's signature verified (true: charged to that client; false: to the "
                                      "source address)", labels=["reason", "verified"])
        for (verified, reason), n in sorted(store.refusal_counts().items()):
            refused.add_metric([reason, str(verified).lower()], n)
        yield refused
        yield from rate_limit_metrics(self.meshfed.limits)
        spent = privacy_view(rounds, runs.run_config)["latest"]
        epsilon = GaugeMetricFamily("meshfed_privacy_epsilon", "Privacy spent in the current run: the run's "
                                    "(dp client) or each client's (dp sample, local)", labels=["scope"])
        if spent["run"] is not None:
            epsilon.add_metric(["run"], spent["run"])
        for cid, value in spent["clients"].items():
            epsilon.add_metric([f"client:{cid}"], value)
        yield epsilon
        secure = [r["secure"] for r in rounds if r.get("secure")]
        yield CounterMetricFamily("meshfed_secure_rounds", "Rounds of the current run aggregated securely (secagg+)",
                                  value=len(secure))
        yield CounterMetricFamily("meshfed_secure_dropouts_recovered", "Clients of the current run's secure rounds "
                                  "that dropped after sharing keys and whose masks were removed",
                                  value=sum(s.get("recovered") or 0 for s in secure))
        yield CounterMetricFamily("meshfed_secure_rounds_abandoned", "Secure rounds abandoned (too few clients at "
                                  "a stage) and played again, since the server started",
                                  value=self.meshfed.rounds.secure.abandoned)
        traffic = self.meshfed.traffic
        yield CounterMetricFamily("meshfed_http_received_bytes", "Update bytes received", value=traffic.bytes_in)
        yield CounterMetricFamily("meshfed_http_sent_bytes", "Model bytes sent", value=traffic.bytes_out)
        sent = CounterMetricFamily("meshfed_model_download_bytes", "Model bytes sent: whole models, or coded steps "
                                   "(download_compression int8)", labels=["kind"])
        sent.add_metric(["full"], traffic.bytes_out - traffic.delta_bytes_out)
        sent.add_metric(["delta"], traffic.delta_bytes_out)
        yield sent
        last = rounds[-1]["timings"] if rounds else {}
        ratio = GaugeMetricFamily("meshfed_compression_ratio", "The last round's float32 bytes over the bytes that "
                                  "moved, per client (1 = uncompressed)", labels=["direction"])
        for direction in ("upload", "download"):
            if last.get(f"{direction}_bytes") and last.get("model_bytes"):
                ratio.add_metric([direction], last["model_bytes"] * last[f"{direction}s"] / last[f"{direction}_bytes"])
        yield ratio


def rate_limit_metrics(limits: Any) -> Iterator[Any]:
    """Each rate-limit rule's limit (per minute; 0 = off) and the requests it refused."""
    configured = GaugeMetricFamily("meshfed_rate_limit_per_minute", "Configured rate limit, requests per minute "
                                   "(0 = off)", labels=["rule"])
    limited = CounterMetricFamily("meshfed_rate_limited", "Requests refused by a rate limit", labels=["rule"])
    for rule, per_minute in limits.per_minute().items():
        configured.add_metric([rule], per_minute)
        limited.add_metric([rule], limits.limited[rule])
    yield configured
    yield limited


class FollowerCollector:
    """A follower's metrics: whether it reaches its leader (scrape the leader for the rest)."""

    def __init__(self, follower: Any):
        self.follower = follower

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily("meshfed_leader_up", "1 if this follower reaches the leader's /healthz",
                                value=int(self.follower.control.alive()))
        yield from rate_limit_metrics(self.follower.limits)


def make_registry(collector: Any) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


@bp.get("/healthz")
def healthz() -> Any:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Any:
    checks = current_app.extensions["meshfed"].readiness()
    ready = all(checks.values())
    return jsonify({"ready": ready, "checks": checks}), 200 if ready else 503


@bp.get("/metrics")
def metrics() -> Any:
    return Response(generate_latest(current_app.extensions["meshfed"].metrics_registry),
                    mimetype="text/plain; version=0.0.4; charset=utf-8")
