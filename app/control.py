"""What the dashboard reads and controls, whether the round loop lives in this process or not.

A leader (or a single server) answers from its own loop and store: LocalControl. A follower, which
serves dashboards only, asks the leader over its REST API with the admin token: RemoteControl. Both
raise the same errors (ConfigError with field errors, MeshfedError with a message), so the
/dashboard handlers in dashboard/events.py do not know which one they have.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import requests

from app.config import config_schema
from app.privacy import privacy_view
from shared.errors import ConfigError, MeshfedError


class LocalControl:
    """The runs, rounds, store and monitor of this process (app.extensions['meshfed'])."""

    def __init__(self, meshfed: Any):
        self.meshfed = meshfed

    def status(self) -> dict[str, Any]:
        return self.meshfed.runs.status()

    def history(self, run_id: str | None = None) -> dict[str, Any]:
        """A run's rounds (the current run's by default) and the list of runs to browse."""
        runs = self.meshfed.runs
        run_id = run_id or runs.run_id
        return {"run_id": run_id, "current": runs.run_id, "rounds": runs.store.rounds(run_id) if run_id else [],
                "runs": runs.store.runs()}

    def clients(self) -> list[dict[str, Any]]:
        return self.meshfed.clients_view()

    def models(self) -> dict[str, Any]:
        runs = self.meshfed.runs
        return {"current": runs.global_version, "versions": runs.store.versions()}

    def system(self) -> dict[str, Any]:
        return self.meshfed.monitor.snapshot()

    def mesh(self) -> dict[str, Any]:
        return self.meshfed.rounds.merges.view()

    def config_schema(self) -> dict[str, Any]:
        return config_schema()

    def privacy(self) -> dict[str, Any]:
        runs = self.meshfed.runs
        rounds = runs.store.rounds(runs.run_id) if runs.run_id else []
        return {"run_id": runs.run_id, **privacy_view(rounds, runs.run_config),
                "audit": runs.store.latest_audit(runs.run_id)}

    def start(self, new_run: bool) -> dict[str, Any]:
        """{run_id, began}: the run and how it began (resumed, continued from the current model, or fresh)."""
        runs = self.meshfed.runs
        return {"run_id": runs.start(new_run=new_run), "began": runs.run.began}

    def stop(self) -> None:
        self.meshfed.runs.stop()

    def set_config(self, changes: dict[str, Any]) -> dict[str, Any]:
        return self.meshfed.runs.set_config(changes).to_dict()

    def rollback(self, version: int) -> int:
        return self.meshfed.runs.rollback(version)


class RemoteControl:
    """The leader's REST API (app/api.py), called by a follower on behalf of its dashboards."""

    def __init__(self, leader_url: str, admin_token: str, timeout: float = 10.0):
        self.leader_url = leader_url.rstrip("/")
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {admin_token}"
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            r = self.http.request(method, self.leader_url + path, json=body, timeout=self.timeout)
        except requests.RequestException as exc:
            raise MeshfedError(f"the leader at {self.leader_url} is unreachable ({type(exc).__name__}); "
                               "is it running?") from exc
        reply = r.json() if r.headers.get("Content-Type", "").startswith("application/json") else {}
        if r.status_code == 400 and reply.get("error") == "invalid_config":
            raise ConfigError(reply.get("fields", {}))
        if not r.ok:
            raise MeshfedError(reply.get("message") or f"the leader answered HTTP {r.status_code}")
        return reply

    def alive(self) -> bool:
        try:
            return self.http.get(self.leader_url + "/healthz", timeout=2).ok
        except requests.RequestException:
            return False

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/api/status")

    def history(self, run_id: str | None = None) -> dict[str, Any]:
        query = f"?{urlencode({'run_id': run_id})}" if run_id else ""
        return {**self._call("GET", "/api/metrics" + query), "runs": self._call("GET", "/api/runs")["runs"]}

    def clients(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/clients")["clients"]

    def models(self) -> dict[str, Any]:
        return self._call("GET", "/api/models")

    def system(self) -> dict[str, Any]:
        return self._call("GET", "/api/system")

    def mesh(self) -> dict[str, Any]:
        return self._call("GET", "/api/mesh")

    def config_schema(self) -> dict[str, Any]:
        return self._call("GET", "/api/config/schema")  # the leader's: its plug-ins are the choices

    def privacy(self) -> dict[str, Any]:
        return self._call("GET", "/api/privacy")

    def start(self, new_run: bool) -> dict[str, Any]:
        reply = self._call("POST", "/api/start", {"new_run": new_run})
        return {"run_id": reply["run_id"], "began": reply.get("status", {}).get("began", {})}

    def stop(self) -> None:
        self._call("POST", "/api/stop")

    def set_config(self, changes: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/api/config", changes)

    def rollback(self, version: int) -> int:
        return self._call("POST", "/api/rollback", {"version": version})["model_version"]
