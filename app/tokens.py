"""The server's two secrets: the admin token and the enrollment token.

Each comes from, in order: its flag, its file flag, its environment variable, the state dir's tokens.json;
failing all of them it is generated once and written to tokens.json (mode 0600), so a restarted server keeps
its tokens and its clients. Only a generated token is ever printed (run_server.py), and only then.
"""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

FILE = "tokens.json"


@dataclass(frozen=True)
class Tokens:
    admin: str
    enrollment: str
    created: tuple[str, ...]  # the names of the tokens generated just now (printed once)
    given: tuple[str, ...]    # the names of the tokens passed in (flag, file or environment)
    path: Path                # where stored tokens live

    def source(self, name: str) -> str:
        """Where token `name` came from, for people: 'new', 'given', or the file it is kept in."""
        return "new" if name in self.created else "given" if name in self.given else str(self.path)


def load_or_create(state_dir: str | Path, admin: str | None, enrollment: str | None) -> Tokens:
    """The tokens given (None = not given), else the stored ones, else new ones, stored."""
    path = Path(state_dir) / FILE
    stored: dict[str, str] = {}
    if path.exists():
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is not readable JSON ({exc}); fix or delete it (new tokens are then made)")
        stored = {k: v for k, v in loaded.items() if isinstance(v, str) and v} if isinstance(loaded, dict) else {}
    created = tuple(name for name, given in (("admin", admin), ("enrollment", enrollment))
                    if not given and name not in stored)
    for name in created:
        stored[name] = secrets.token_hex(16)
    if created:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(stored, f)
        os.replace(tmp, path)
    given = tuple(name for name, value in (("admin", admin), ("enrollment", enrollment)) if value)
    return Tokens(admin or stored["admin"], enrollment or stored["enrollment"], created, given, path)
