"""Server resources over time (psutil) and alerts derived from rounds, refusals and resources."""
from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable

import psutil

# Alert thresholds (visible defaults; each one a rule below).
ACCURACY_DROP_ROUNDS = 2     # warn when test accuracy fell this many rounds in a row
CLIENT_REFUSALS = 3          # warn when one client had this many updates refused in this server's life
MEMORY_PERCENT = 90.0        # critical when system memory use passes this
CPU_PERCENT = 95.0           # warn when CPU stays above this for CPU_SAMPLES samples
CPU_SAMPLES = 5
PRIVACY_WARN = 0.8           # warn when a run has spent this share of its privacy budget
SAMPLE_SECONDS = 2.0         # one resource sample every this many seconds (the dashboard feed's beat)
HISTORY = 300                # samples kept (10 minutes)


class Monitor:
    """Keeps resource samples and alerts; `emit(event, data)` publishes them (dashboard/events.py)."""

    def __init__(self, emit: Callable[[str, dict[str, Any]], None]):
        self._emit = emit
        self._lock = threading.Lock()
        self.samples: collections.deque[dict[str, float]] = collections.deque(maxlen=HISTORY)
        self.alerts: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)
        self._accuracies: list[float] = []
        self._refusals: collections.Counter[str] = collections.Counter()
        self._raised: set[str] = set()
        self._process = psutil.Process()
        psutil.cpu_percent(interval=None)  # the first calls only prime the counters
        self._process.cpu_percent(interval=None)
        self._cores = psutil.cpu_count() or 1

    def sample(self) -> dict[str, float]:
        vm = psutil.virtual_memory()
        net = psutil.net_io_counters()
        s = {"time": time.time(), "cpu_percent": psutil.cpu_percent(interval=None),  # the host's, all cores
             "process_cpu_percent": self._process.cpu_percent(interval=None) / self._cores,  # this server's share
             "memory_percent": vm.percent, "process_memory_mb": self._process.memory_info().rss / 2**20,
             "net_sent_mb": net.bytes_sent / 2**20, "net_recv_mb": net.bytes_recv / 2**20}
        with self._lock:
            self.samples.append(s)
            recent = list(self.samples)[-CPU_SAMPLES:]
        self._emit("system_update", s)
        if vm.percent > MEMORY_PERCENT:
            self.alert("critical", "memory", f"memory use at {vm.percent:.0f}% (> {MEMORY_PERCENT:.0f}%)")
        if len(recent) == CPU_SAMPLES and all(r["cpu_percent"] > CPU_PERCENT for r in recent):
            self.alert("warning", "cpu", f"CPU above {CPU_PERCENT:.0f}% for {CPU_SAMPLES * SAMPLE_SECONDS:.0f}s")
        return s

    def alert(self, severity: str, kind: str, message: str, key: str | None = None) -> None:
        """Record and publish an alert; the same key is raised once until it clears."""
        key = key or kind
        with self._lock:
            if key in self._raised:
                return
            self._raised.add(key)
            item = {"time": time.time(), "severity": severity, "kind": kind, "message": message}
            self.alerts.append(item)
        self._emit("alert", item)

    def clear(self, key: str) -> None:
        with self._lock:
            self._raised.discard(key)

    def observe(self, event: str, data: dict[str, Any]) -> None:
        """Watch what the round loop publishes and derive alerts from it."""
        if event == "training_started":
            self._accuracies.clear()
            self.clear("privacy")
        elif event == "metrics_update":
            self._privacy(data)
            if data.get("accuracy") is None:  # not evaluated this round (eval_every)
                return
            self._accuracies.append(float(data["accuracy"]))
            last = self._accuracies[-(ACCURACY_DROP_ROUNDS + 1):]
            if len(last) == ACCURACY_DROP_ROUNDS + 1 and all(b < a for a, b in zip(last, last[1:])):
                self.alert("warning", "accuracy", f"test accuracy fell {ACCURACY_DROP_ROUNDS} rounds in a row "
                           f"(now {100 * last[-1]:.2f}% at round {data['round']})", key=f"accuracy-{data['round']}")
        elif event == "update_refused":
            client = str(data.get("client_id"))
            self._refusals[client] += 1
            if self._refusals[client] == CLIENT_REFUSALS:
                self.alert("warning", "client", f"client {client} had {CLIENT_REFUSALS} updates refused "
                           f"(last: {data.get('reason')})", key=f"client-{client}")

    def _privacy(self, row: dict[str, Any]) -> None:
        """Warn once a run has spent PRIVACY_WARN of its privacy budget (the run's, or any client's)."""
        privacy = row.get("privacy") or {}
        target = privacy.get("target") or 0
        spent = max([privacy.get("epsilon") or 0.0, *privacy.get("clients", {}).values()])
        if target and spent >= PRIVACY_WARN * target:
            self.alert("warning", "privacy", f"{100 * spent / target:.0f}% of the privacy budget spent (epsilon "
                       f"{spent:.2f} of {target:g}, round {row['round']})", key="privacy")

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"samples": list(self.samples), "alerts": list(self.alerts)}
