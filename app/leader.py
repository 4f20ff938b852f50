"""Exactly one leader per message queue: a Redis lock with a time-to-live, renewed while it lives.

The leader is chosen by configuration (`--role leader`, the default); the lock only makes a mistake
loud. A second leader on the same Redis refuses to start and names the holder. If the leader dies,
its lock expires after TTL_SECONDS and a restarted (or new) leader takes it over.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading

import redis

log = logging.getLogger("meshfed.leader")
KEY = "meshfed:leader"
TTL_SECONDS = 15.0


def leader_identity(port: int) -> str:
    """What a leader writes into the lock: host and port, so a refusal names who holds it."""
    return f"{socket.gethostname()}:{port}"


def release_if_held(url: str, identity: str) -> None:
    """Free the lock if `identity` (a leader that has exited) still holds it; another's stays."""
    lock = LeaderLock(url, identity)
    lock.lock.local.token = identity.encode()
    lock.release()


class LeaderLock:
    def __init__(self, url: str, identity: str | None = None):
        self.redis = redis.Redis.from_url(url, socket_timeout=5)
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}"
        self.lock = self.redis.lock(KEY, timeout=TTL_SECONDS, thread_local=False)
        self._stop = threading.Event()

    def acquire(self) -> None:
        """Take the lock or raise RuntimeError naming the process that holds it."""
        try:
            taken = self.lock.acquire(blocking=False, token=self.identity.encode())
            holder = None if taken else self.redis.get(KEY)
            if holder == self.identity.encode():  # this same leader, restarted within the TTL
                self.redis.delete(KEY)
                taken = self.lock.acquire(blocking=False, token=self.identity.encode())
        except redis.RedisError as exc:
            raise RuntimeError(f"cannot reach the message queue to take the leader lock: {exc}") from exc
        if not taken:
            raise RuntimeError(f"another leader holds {KEY} ({(holder or b'?').decode()}); start this process "
                               f"with --role follower, or wait {TTL_SECONDS:.0f}s if that leader has died")
        threading.Thread(target=self._renew, name="leader-lock", daemon=True).start()
        log.info("leader lock taken (%s)", self.identity)

    def _renew(self) -> None:
        while not self._stop.wait(TTL_SECONDS / 3):
            try:
                self.lock.reacquire()
            except redis.exceptions.LockNotOwnedError:
                # Expired (Redis lost it or we stalled past the TTL): take it again, or step down.
                if not self.lock.acquire(blocking=False, token=self.identity.encode()):
                    log.critical("lost the leader lock to %s; stopping this process", self.redis.get(KEY))
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            except redis.RedisError as exc:  # Redis briefly away: no one else can take the lock either
                log.warning("could not renew the leader lock: %s", exc)

    def release(self) -> None:
        self._stop.set()
        try:
            self.lock.release()
        except redis.RedisError:
            pass
