"""Peer discovery with python-zeroconf (mDNS/DNS-SD), plus static peers for networks without multicast.

Each mesh client advertises `<client id>._meshfed._tcp.local.` with a TXT record carrying its client
id, key fingerprint, port, model version and mode, browses for the others and forgets those that say
goodbye. What a TXT record says is only a hint: every message is verified (mesh/wire.py).
"""
from __future__ import annotations

import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

log = logging.getLogger("meshfed.mesh")
SERVICE_TYPE = "_meshfed._tcp.local."


@dataclass(frozen=True)
class Peer:
    client_id: str
    fingerprint: str
    host: str
    port: int
    model_version: int
    source: str  # 'zeroconf' or 'static'
    mode: str = "?"  # what its TXT record says: 'online' or 'mesh'

    @property
    def address(self) -> str:
        return f"http://{self.host}:{self.port}"


def static_peers(spec: str) -> list[Peer]:
    """--mesh-peers host:port,host:port (ids and keys are learned from their signed messages)."""
    peers = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--mesh-peers: {item!r} is not host:port")
        peers.append(Peer(client_id=item, fingerprint="", host=host, port=int(port), model_version=-1,
                          source="static"))
    return peers


class Discovery:
    """Advertise this client and keep a live table of the others (thread-safe)."""

    def __init__(self, client_id: str, fingerprint: str, host: str, port: int, model_version: int = 0,
                 interfaces: list[str] | None = None):
        self.client_id, self.fingerprint, self.host, self.port = client_id, fingerprint, host, port
        self.interfaces = interfaces  # e.g. ["127.0.0.1"] on loopback; None = zeroconf's default
        self._model_version = model_version
        self._mode = "online"
        self._peers: dict[str, Peer] = {}
        self._lock = threading.Lock()
        self._resolver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-resolve")
        self.zc: Zeroconf | None = None
        self.info: ServiceInfo | None = None

    def _service_info(self) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE, f"{self.client_id}.{SERVICE_TYPE}", addresses=[socket.inet_aton(self.host)],
            port=self.port, server=f"{self.client_id}.local.",
            properties={"id": self.client_id, "fp": self.fingerprint, "port": str(self.port),
                        "version": str(self._model_version), "mode": self._mode})

    def start(self) -> None:
        kwargs: dict[str, Any] = {"ip_version": IPVersion.V4Only}
        if self.interfaces is not None:
            kwargs["interfaces"] = self.interfaces
        self.zc = Zeroconf(**kwargs)
        self.info = self._service_info()
        self.zc.register_service(self.info, allow_name_change=False)
        ServiceBrowser(self.zc, SERVICE_TYPE, handlers=[self._on_change])
        log.info("mesh: advertising %s on %s:%d", self.client_id, self.host, self.port)

    def set_model_version(self, version: int, mode: str | None = None) -> None:
        """Re-announce with the new model version (and mode) in the TXT record."""
        self._model_version = version
        self._mode = mode or self._mode
        if self.zc is not None:
            self.info = self._service_info()
            self.zc.update_service(self.info)

    def peers(self) -> list[Peer]:
        with self._lock:
            return list(self._peers.values())

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        # Called on zeroconf's own thread, which must not block: resolve on ours.
        if state_change is ServiceStateChange.Removed:
            with self._lock:
                gone = self._peers.pop(name, None)
            if gone:
                log.info("mesh: %s left", gone.client_id)
        else:
            self._resolver.submit(self._resolve, name)

    def _resolve(self, name: str) -> None:
        zc = self.zc
        info = zc.get_service_info(SERVICE_TYPE, name, timeout=3000) if zc is not None else None
        if info is None or not info.parsed_addresses():
            return
        txt = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        if txt.get("id") == self.client_id:
            return  # ourselves
        try:
            peer = Peer(client_id=txt["id"], fingerprint=txt["fp"], host=info.parsed_addresses()[0],
                        port=int(txt.get("port", info.port)), model_version=int(txt.get("version", -1)),
                        source="zeroconf", mode=txt.get("mode", "?"))
        except (KeyError, ValueError):
            log.warning("mesh: ignoring %s: its TXT record lacks id/fp/port/version", name)
            return
        with self._lock:
            known = name in self._peers
            self._peers[name] = peer
        if not known:
            log.info("mesh: discovered %s at %s (%s)", peer.client_id, peer.address, peer.fingerprint[:19])

    def close(self) -> None:
        """Say goodbye (peers forget us at once) and stop."""
        if self.zc is not None:
            if self.info is not None:
                self.zc.unregister_service(self.info)
            self.zc.close()
            self.zc = None
        self._resolver.shutdown(wait=False, cancel_futures=True)
