"""Files that survive a crash (written whole or not at all), and secrets kept in files."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write data to path so that a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_secret(path: str) -> str:
    """A token kept in a file (its first word); ValueError naming the file if it is empty or unreadable."""
    try:
        lines = Path(path).read_text().split()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    token = lines[0] if lines else ""
    if not token:
        raise ValueError(f"{path} holds no token")
    return token
