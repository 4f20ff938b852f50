"""Whom a mesh client believes, and how an operator vouches for a stranger.

A peer is trusted if the server's roster (cached while the client was online) lists its id with the
same key fingerprint, or if an operator confirmed that fingerprint out of band: the stranger shows
its fingerprint as a QR code (terminal and PNG/SVG, fingerprint_qr) and the operator runs
`run_client.py --confirm-peer <fingerprint>` on the trusting client. Both lists live in one JSON
file in the client's key directory, so they survive restarts.
"""
from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

from typing import Any

from mesh.wire import MeshRefused
from shared import crypto
from shared.protocol import roster_bytes


class Trust:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mtime = -1.0
        self.roster: dict[str, str] = {}        # client id -> fingerprint, from the server
        self.confirmed: set[str] = set()        # fingerprints an operator confirmed
        self.server_fingerprint: str | None = None  # pinned on the first roster (trust on first use)
        self._reload()

    def _reload(self) -> None:
        """Re-read the file if another process (run_client.py --confirm-peer) changed it."""
        mtime = self.path.stat().st_mtime if self.path.exists() else -1.0
        if mtime != self._mtime:
            data = json.loads(self.path.read_text()) if mtime >= 0 else {}
            self.roster = dict(data.get("roster", {}))
            self.confirmed = set(data.get("confirmed", []))
            self.server_fingerprint = data.get("server_fingerprint")
            self._mtime = mtime

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"roster": self.roster, "confirmed": sorted(self.confirmed),
                                   "server_fingerprint": self.server_fingerprint}, indent=1))
        os.replace(tmp, self.path)  # atomic: a crash leaves the old file or the new one
        self._mtime = self.path.stat().st_mtime

    def set_roster(self, roster: dict[str, str]) -> None:
        """Replace the cached roster (client id -> fingerprint)."""
        with self._lock:
            self._reload()
            self.roster = dict(roster)
            self._save()

    def accept_roster(self, signed: dict[str, Any]) -> None:
        """Adopt a roster from GET /api/roster after checking the server's signature; the server's key
        is pinned the first time, and a roster signed by another key is refused."""
        try:
            pem, clients = str(signed["server_key"]), dict(signed["clients"])
            fingerprint = crypto.fingerprint(pem)
            valid = crypto.verify(crypto.load_public_key(pem), roster_bytes(clients, float(signed["issued_at"])),
                                  str(signed["signature"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise MeshRefused("malformed", f"roster is not valid: {exc}") from exc
        with self._lock:
            self._reload()
            if self.server_fingerprint not in (None, fingerprint):
                raise MeshRefused("key_mismatch", "roster signed by another server key than the pinned one")
            if not valid:
                raise MeshRefused("bad_signature", "roster signature does not verify")
            self.server_fingerprint, self.roster = fingerprint, {str(k): str(v) for k, v in clients.items()}
            self._save()

    def confirm(self, fingerprint: str) -> None:
        with self._lock:
            self._reload()
            self.confirmed.add(fingerprint)
            self._save()

    def check(self, client_id: str, fingerprint: str) -> None:
        """Return if trusted; else raise MeshRefused saying what would make it trusted."""
        with self._lock:
            self._reload()
        pinned = self.roster.get(client_id)
        if pinned is not None and pinned != fingerprint:  # a confirmation never overrides the roster
            raise MeshRefused("key_mismatch", f"{client_id} is on the roster with another key")
        if pinned == fingerprint or fingerprint in self.confirmed:
            return
        raise MeshRefused("unknown_peer", f"{client_id} ({fingerprint}) is not on the roster; confirm it with "
                                          f"run_client.py --confirm-peer {fingerprint}")


def fingerprint_qr(fingerprint: str, out_dir: str | Path | None = None) -> str:
    """The fingerprint as a QR code: returns it drawn for a terminal; writes fingerprint.png/.svg."""
    import qrcode  # only the operator command draws QR codes
    import qrcode.image.svg

    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, border=2)
    qr.add_data(fingerprint)
    qr.make(fit=True)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        qr.make_image().save(out / "fingerprint.png")
        qr.make_image(image_factory=qrcode.image.svg.SvgPathImage).save(out / "fingerprint.svg")
    text = io.StringIO()
    qr.print_ascii(out=text, invert=True)
    return text.getvalue()
