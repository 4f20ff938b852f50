"""python-socketio's client managers with each session's rooms indexed, so that a disconnect costs O(its rooms).

python-socketio's manager finds a disconnecting session's rooms by testing every room of the namespace, and every
session has a room of its own: with n clients each disconnect is O(n), and n clients leaving together O(n²)
under the interpreter lock. Measured with bench/swarm.py (1,000 clients SIGKILLed at once, one gunicorn worker):
26-77 s before the server counted them gone, /healthz unanswered for up to 6.6 s meanwhile, 28% of the samples of
`py-spy record --gil` in that loop. Issue 20 saw a gunicorn worker go silent and be killed by its master for it.

The index follows the manager's two ways in and out of a room (basic_enter_room, basic_leave_room; connects,
joins, closes and disconnects all go through them); a disconnect leaves the rooms the index names.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

import socketio


class IndexedRooms:
    """Mixin for a python-socketio client manager (Manager, RedisManager...): (namespace, sid) -> its rooms."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rooms_of: defaultdict[tuple[str, str], set[Any]] = defaultdict(set)
        self._index = threading.Lock()  # a join and a leave of one session may race (async handlers)

    def basic_enter_room(self, sid: str, namespace: str, room: Any, eio_sid: Any = None) -> None:
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)  # type: ignore[misc]
        with self._index:
            self._rooms_of[(namespace, sid)].add(room)

    def basic_leave_room(self, sid: str, namespace: str, room: Any) -> None:
        super().basic_leave_room(sid, namespace, room)  # type: ignore[misc]
        with self._index:
            rooms = self._rooms_of.get((namespace, sid))
            if rooms is not None:
                rooms.discard(room)
                if not rooms:
                    del self._rooms_of[(namespace, sid)]

    def get_rooms(self, sid: str, namespace: str) -> list[Any]:
        with self._index:
            return [room for room in self._rooms_of.get((namespace, sid), ()) if room is not None]

    def basic_disconnect(self, sid: str, namespace: str, **kwargs: Any) -> None:
        """What the library's does (leave every room, forget the session's callbacks and pending states), with the
        rooms found in the index instead of by testing each one."""
        if namespace not in self.rooms:  # type: ignore[attr-defined]
            return
        with self._index:
            rooms = list(self._rooms_of.get((namespace, sid), ()))
        for room in rooms:
            self.basic_leave_room(sid, namespace, room)
        self.callbacks.pop(sid, None)  # type: ignore[attr-defined]
        for pending in (self.pending_connect, self.pending_disconnect):  # type: ignore[attr-defined]
            waiting = pending.get(namespace)
            if waiting is not None and sid in waiting:
                waiting.remove(sid)
                if not waiting:
                    del pending[namespace]


class IndexedManager(IndexedRooms, socketio.Manager):
    """One process's sessions."""


class IndexedRedisManager(IndexedRooms, socketio.RedisManager):
    """Sessions shared through Redis (--message-queue): a leader and its followers."""
