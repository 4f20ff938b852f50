"""A client's connections to the server: python-socketio's clients, patient on every connect, and an HTTP session
that sends a request again when its connection dropped.

python-socketio waits 1 s for the server's answer to the namespace's connect, on its own reconnects too
(FACTS.md): a server busy with hundreds of connects answers later, the client gives up, drops the websocket and
tries again, and the server is busier still (issue 20 measured 1,000 clients making 1,700-1,800 connects a minute,
each dropped 2-40 ms later; bench/swarm.py counts no reconnect since). These wait CONNECT_WAIT seconds.
Reconnects back off with jitter (the library's randomization_factor, in seconds either side of the doubling
delay), so clients dropped together come back apart.

HTTP: a server closes an idle keep-alive connection while the client sends on it, or resets connections under
load (measured with bench/swarm.py: 9-16 of 1,000 updates a round failed with "connection reset by peer" when
clients did not try again, and each held its round to the deadline). The session tries such a request again (a
refused connection twice, one whose answer was lost once). An update sent twice is safe for the model: the server
takes one and refuses the other as a replay (the client then hears "refused" for an update that was taken).
"""
from __future__ import annotations

from typing import Any

import requests
import socketio
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

CONNECT_WAIT = 30.0                 # seconds for the namespace's answer on each connect
RECONNECT = {"reconnection_delay": 1.0, "reconnection_delay_max": 5.0, "randomization_factor": 1.0}
# connection and read errors only (status 0: the server's answers, 429 included, come back as they are)
AGAIN = Retry(total=2, connect=2, read=1, status=0, other=0, allowed_methods=None, backoff_factor=0.5,
              raise_on_status=False)


def http_session() -> requests.Session:
    session = requests.Session()
    for scheme in ("http://", "https://"):
        session.mount(scheme, HTTPAdapter(max_retries=AGAIN))
    return session


class PatientClient(socketio.Client):
    def connect(self, *args: Any, wait_timeout: float = CONNECT_WAIT, **kwargs: Any) -> None:
        super().connect(*args, wait_timeout=wait_timeout, **kwargs)


class PatientAsyncClient(socketio.AsyncClient):
    """The same for asyncio (bench/swarm.py's simulated clients)."""

    async def connect(self, *args: Any, wait_timeout: float = CONNECT_WAIT, **kwargs: Any) -> None:
        await super().connect(*args, wait_timeout=wait_timeout, **kwargs)
