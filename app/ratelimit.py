"""Rate limits per source address and per verified client. Not Flask-Limiter's view decorators, because two of
the limits are not views: Socket.IO connects, and a client's identity, which is known only once its signature
verified, so nobody can spend another client's allowance.

A rule's limit is in the `limits` library's notation ("60/minute", "10 per second"), parsed by it; "off" disables
it. Counting is GCRA (the generic cell rate algorithm, a leaky bucket kept as one time per key): a limit of N per
period lets N requests through at once, then N per period. It is O(1) a request with no background work. limits'
MemoryStorage, which counted before, starts a timer thread every 10 ms while requests come and rescans every key
in it: with 1,000 clients, 28% of the server's interpreter time (py-spy --gil under bench/swarm.py).

The defaults sit far above what an honest client sends (one update a round, one sync per outage, a connect per
restart) and leave room for many clients behind one address (NAT, or every demo client on 127.0.0.1).
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Mapping

from limits import RateLimitItem, parse

from shared.errors import ConfigError, UpdateRefused

PRUNE_EVERY = 4096  # requests between two sweeps of the keys whose bucket has emptied (memory stays bounded)
DEFAULT_RULES: dict[str, str] = {
    "update-per-address": "1200/minute",   # POST /api/update from one source address
    "update-per-client": "60/minute",      # verified updates of one client
    "sync-per-address": "600/minute",      # POST /api/sync from one source address
    "sync-per-client": "12/minute",        # verified offline contributions of one client
    "connect-per-address": "600/minute",   # /fl connects and GET /api/challenge from one address
    "secagg-per-client": "600/minute",     # secure aggregation's stage messages of one client (3 a round)
    "login-per-address": "20/minute",      # dashboard login attempts from one address
}


class RateLimited(UpdateRefused):
    """Over a rate limit: answered 429 with Retry-After."""

    def __init__(self, rule: str, limit: RateLimitItem, retry_after: float):
        self.rule, self.retry_after = rule, retry_after
        super().__init__("rate_limited", f"over {limit} ({rule}); retry in {retry_after:.0f}s")


def parse_rules(overrides: Mapping[str, str]) -> dict[str, RateLimitItem | None]:
    """DEFAULT_RULES with `overrides` applied, parsed; ConfigError naming a bad rule or limit."""
    rules: dict[str, RateLimitItem | None] = {}
    errors: dict[str, str] = {}
    for name in overrides:
        if name not in DEFAULT_RULES:
            errors[name] = f"unknown rate-limit rule; known: {', '.join(DEFAULT_RULES)}"
    for name, default in DEFAULT_RULES.items():
        text = overrides.get(name, default)
        try:
            rules[name] = None if text == "off" else parse(text)
        except ValueError:
            errors[name] = f"{text!r} is not a limit like '60/minute' or 'off'"
    if errors:
        raise ConfigError(errors)
    return rules


class RateLimits:
    """A GCRA bucket per (rule, key), in memory; thread-safe."""

    def __init__(self, overrides: Mapping[str, str] | None = None):
        self.rules = parse_rules(overrides or {})
        self._due: dict[tuple[str, str], float] = {}  # (rule, key) -> when its bucket is empty again (monotonic)
        self._lock = threading.Lock()
        self._hits = 0
        self.limited: Counter[str] = Counter()  # requests refused, by rule (/metrics)

    def hit(self, rule: str, key: str | None) -> None:
        """Count one request of `key` under `rule`; RateLimited if it is over the limit."""
        limit = self.rules[rule]
        if limit is None:
            return
        period = float(limit.get_expiry())
        interval, slot, now = period / limit.amount, (rule, key or "-"), time.monotonic()
        with self._lock:
            due = max(self._due.get(slot, now), now) + interval
            if due - now > period:  # N already inside the period: the next fits once the oldest has drained
                self.limited[rule] += 1
                raise RateLimited(rule, limit, max(1.0, due - period - now))
            self._due[slot] = due
            self._hits += 1
            if self._hits % PRUNE_EVERY == 0:
                self._due = {k: t for k, t in self._due.items() if t > now}

    def per_minute(self) -> dict[str, float]:
        """Each rule's limit as requests per minute (off: 0), for /metrics."""
        return {name: 0.0 if item is None else item.amount * 60.0 / item.get_expiry()
                for name, item in self.rules.items()}
