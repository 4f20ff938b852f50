"""The one error hierarchy of meshfed; edges turn these into HTTP / Socket.IO replies."""
from __future__ import annotations


class MeshfedError(Exception):
    """Root of every error meshfed raises on purpose."""


class ConfigError(MeshfedError):
    """A configuration was invalid; `fields` maps each bad field to what is wrong with it."""

    def __init__(self, fields: dict[str, str]):
        self.fields = dict(fields)
        super().__init__("invalid configuration: " + "; ".join(f"{k}: {v}" for k, v in self.fields.items()))


class DatasetNotFound(MeshfedError):
    """A dataset could not be found offline and could not be downloaded."""


class UpdateRefused(MeshfedError):
    """An update (or model upload) was refused; `reason` is a stable machine-readable code."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(f"{reason}: {message}")


class RegistrationRefused(MeshfedError):
    """A client could not register; `reason` is a stable code (app/enrollment.py lists them)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(f"{reason}: {message}")


class SyncRefused(MeshfedError):
    """The server refused an offline contribution; `reason` is its stable code (app/verify.py)."""

    RETRY = ("rate_limited", "unknown_client")  # worth sending again later; any other refusal is final

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(f"{reason}: {message}")
