"""python-socketio's clients, patient on every connect.

python-socketio waits 1 s for the server's answer to the namespace's connect, on its own reconnects too
(FACTS.md): a server busy with hundreds of connects answers later, the client gives up, drops the websocket and
tries again, and the server is busier still (measured: 1,000 clients made 1,700-1,800 connects a minute, each
dropped 2-40 ms later). These wait CONNECT_WAIT seconds. Reconnects back off with jitter (the library's
randomization_factor, in seconds either side of the doubling delay), so clients dropped together come back apart.
"""
from __future__ import annotations

from typing import Any

import socketio

CONNECT_WAIT = 30.0                 # seconds for the namespace's answer on each connect
RECONNECT = {"reconnection_delay": 1.0, "reconnection_delay_max": 5.0, "randomization_factor": 1.0}


class PatientClient(socketio.Client):
    def connect(self, *args: Any, wait_timeout: float = CONNECT_WAIT, **kwargs: Any) -> None:
        super().connect(*args, wait_timeout=wait_timeout, **kwargs)


class PatientAsyncClient(socketio.AsyncClient):
    """The same for asyncio (bench/swarm.py's simulated clients)."""

    async def connect(self, *args: Any, wait_timeout: float = CONNECT_WAIT, **kwargs: Any) -> None:
        await super().connect(*args, wait_timeout=wait_timeout, **kwargs)
