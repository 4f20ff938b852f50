"""The meshfed server: create_app(config) builds Flask + Flask-SocketIO around the round loop.

Loaded lazily, so that the plug-in API (`from app.strategy import register`) imports neither Flask nor torch.
"""
from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from app.server import create_app
        return create_app
    raise AttributeError(f"module 'app' has no attribute {name!r}")
