"""app/rooms.py: the indexed client manager keeps exactly the state python-socketio's own would, through any mix
of connects, joins, leaves, closed rooms and disconnects, and a disconnect no longer looks at every room."""
from __future__ import annotations

import itertools
import json
import random
from types import SimpleNamespace

import socketio

from app.rooms import IndexedManager


def managers():
    ids = itertools.count()
    server = SimpleNamespace(eio=SimpleNamespace(generate_id=lambda: f"s{next(ids)}"),
                             packet_class=SimpleNamespace(json=json))
    plain, indexed = socketio.Manager(), IndexedManager()
    for m in (plain, indexed):
        m.set_server(server)
    return plain, indexed, ids


def test_the_indexed_manager_keeps_the_same_rooms_as_python_socketios_through_random_operations():
    rng = random.Random(7)
    plain, indexed, _ = managers()
    live: dict[tuple[str, str], str] = {}  # (namespace, eio sid) -> sid, the same in both (ids are replayed)
    for step in range(3000):
        op, ns = rng.random(), rng.choice(["/fl", "/dashboard"])
        mine = [(n, sid) for (n, _), sid in live.items() if n == ns]
        if op < 0.3 or not mine:
            eio = f"e{step}"
            sids = set()
            for m in (plain, indexed):  # both draw the next id from the same counter: give them the same one
                m.server.eio.generate_id = (lambda value: lambda: value)(f"x{step}")
                sids.add(m.connect(eio, ns))
            live[(ns, eio)] = sids.pop()
        elif op < 0.55:
            _, sid = rng.choice(mine)
            room = rng.choice(["all", "admins", "round-1"])
            for m in (plain, indexed):
                m.enter_room(sid, ns, room)
        elif op < 0.7:
            _, sid = rng.choice(mine)
            room = rng.choice(["all", "admins", "round-1"])
            for m in (plain, indexed):
                m.leave_room(sid, ns, room)
        elif op < 0.75:
            room = rng.choice(["all", "admins", "round-1"])
            for m in (plain, indexed):
                m.close_room(room, ns)
        else:
            _, sid = rng.choice(mine)
            del live[next(k for k, v in live.items() if v == sid and k[0] == ns)]
            for m in (plain, indexed):
                m.pre_disconnect(sid, ns)
                m.disconnect(sid, ns)
        assert indexed.rooms == plain.rooms, step
        assert (indexed.pending_connect, indexed.pending_disconnect) == (plain.pending_connect, plain.pending_disconnect)
    for (ns, _), sid in live.items():
        assert sorted(indexed.get_rooms(sid, ns)) == sorted(plain.get_rooms(sid, ns))
    assert len(live) > 100  # the walk kept many sessions alive at once


class NoScans(dict):
    """A namespace's rooms that refuse to be walked: what a disconnect must no longer do."""

    def copy(self):
        raise AssertionError("a disconnect walked every room")

    def items(self):
        raise AssertionError("a disconnect walked every room")


def test_a_disconnect_leaves_its_own_rooms_without_walking_everyone_elses():
    plain, indexed, _ = managers()
    sids = [indexed.connect(f"e{i}", "/fl") for i in range(1000)]
    indexed.enter_room(sids[0], "/fl", "admins")
    indexed.rooms["/fl"] = NoScans(indexed.rooms["/fl"])
    indexed.pre_disconnect(sids[0], "/fl")
    indexed.disconnect(sids[0], "/fl")
    rooms = indexed.rooms["/fl"]
    assert sids[0] not in rooms and "admins" not in rooms and sids[0] not in dict.get(rooms, None)
    assert len(dict.get(rooms, None)) == 999 and indexed.get_rooms(sids[1], "/fl") == [sids[1]]
    plain.rooms["/fl"] = NoScans()
    try:  # python-socketio's own manager does walk them
        plain.basic_disconnect("anyone", "/fl")
        raise RuntimeError("python-socketio no longer walks every room: app/rooms.py may go")
    except AssertionError:
        pass
