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

import qrcode
import qrcode.image.svg

from mesh.wire import MeshRefused


def trust_path(key_dir: str | Path, client_id: str) -> Path:
    return Path(key_dir) / f"{client_id}.trust.json"


class Trust:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.roster: dict[str, str] = dict(data.get("roster", {}))    # client id -> fingerprint
        self.confirmed: set[str] = set(data.get("confirmed", []))     # fingerprints an operator confirmed

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"roster": self.roster, "confirmed": sorted(self.confirmed)}, indent=1))
        os.replace(tmp, self.path)  # atomic: a crash leaves the old file or the new one

    def set_roster(self, roster: dict[str, str]) -> None:
        """Replace the cached roster (client id -> fingerprint) with the server's newest."""
        with self._lock:
            self.roster = dict(roster)
            self._save()

    def confirm(self, fingerprint: str) -> None:
        with self._lock:
            self.confirmed.add(fingerprint)
            self._save()

    def check(self, client_id: str, fingerprint: str) -> None:
        """Return if trusted; else raise MeshRefused saying what would make it trusted."""
        pinned = self.roster.get(client_id)
        if pinned is not None and pinned != fingerprint:  # a confirmation never overrides the roster
            raise MeshRefused("key_mismatch", f"{client_id} is on the roster with another key")
        if pinned == fingerprint or fingerprint in self.confirmed:
            return
        raise MeshRefused("unknown_peer", f"{client_id} ({fingerprint}) is not on the roster; confirm it with "
                                          f"run_client.py --confirm-peer {fingerprint}")


def fingerprint_qr(fingerprint: str, out_dir: str | Path | None = None) -> str:
    """The fingerprint as a QR code: returns it drawn for a terminal; writes fingerprint.png/.svg."""
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
