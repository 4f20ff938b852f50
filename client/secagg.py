"""A client's side of one secure round (app/secagg.py has the stages and what the server checks).

SecureSession makes the round's keys, checks the roster the server relays (every neighbour's keys signed by
that neighbour's RSA key, a threshold above half its neighbourhood), shares its secrets among its neighbours
sealed for each, masks its quantised update, and answers the reveal: self-mask shares of those who survived,
mask-key shares of those who dropped, never both for one client and never with fewer survivors than the
threshold. Anything that does not check out raises SecAggError: the client then sends nothing more this
round, and the server recovers it as a dropout; it never lets a wrong mask into the sum.
"""
from __future__ import annotations

import base64
import os
from typing import Any

import numpy as np

from shared import crypto, secagg
from shared.secagg import SecAggError, audit

class SecureSession:
    def __init__(self, key: Any, client_id: str, run_id: str, round_no: int):
        self.key, self.client_id, self.run_id, self.round = key, client_id, run_id, round_no
        self.mask_private, self.mask_public = secagg.new_keypair()
        self.share_private, self.share_public = secagg.new_keypair()
        self.self_mask = os.urandom(secagg.SECRET_BYTES)
        self.neighbours: dict[str, dict[str, Any]] = {}  # id -> its checked roster entry
        self.held: dict[str, tuple[int, int]] = {}       # owner -> (mask-key share, self-mask share) we hold
        self.shared: list[str] = []                      # neighbours whose shares arrived (in the secure set)
        self.roster: dict[str, Any] = {}

    @property
    def context(self) -> str:
        return f"{self.run_id}/{self.round}"

    def _signed(self, stage: str, **fields: Any) -> dict[str, Any]:
        message = {"stage": stage, "run_id": self.run_id, "round": self.round, "client_id": self.client_id, **fields}
        return {**message, "signature": crypto.sign(self.key, secagg.signed_bytes(message))}

    def keys_message(self) -> dict[str, Any]:
        return self._signed("keys", mask_key=self.mask_public.hex(), share_key=self.share_public.hex(),
                            commitment=secagg.commitment(self.self_mask))

    def on_roster(self, roster: dict[str, Any]) -> dict[str, Any]:
        """Check the roster; the shares message for our neighbours."""
        try:
            entries, xs, t = roster["neighbours"], roster["x"], int(roster["threshold"])
            weight, total, clients, clip = (int(roster["weight"]), int(roster["total_weight"]),
                                            int(roster["clients"]), float(roster["clip"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggError(f"the roster is not well formed: {exc}") from None
        if not entries or not t > (len(entries) + 1) / 2 or t > len(entries) + 1:
            raise SecAggError(f"threshold {t} of a neighbourhood of {len(entries) + 1}: it must be more than half "
                              "(else two groups of neighbours could each rebuild a secret) and at most all")
        if not 0 < weight <= total or clients < len(entries) + 1 or not clip > 0:
            raise SecAggError("the roster's weights, client count or range are out of bounds")
        for entry in entries:
            cid = entry.get("client_id")
            message = {"stage": "keys", "run_id": self.run_id, "round": self.round, "client_id": cid,
                       **{k: entry.get(k) for k in ("mask_key", "share_key", "commitment")}}
            try:
                pem = crypto.load_public_key(str(entry.get("public_key")))
            except ValueError as exc:
                raise SecAggError(f"{cid}'s public key: {exc}") from None
            if not crypto.verify(pem, secagg.signed_bytes(message), str(entry.get("signature"))):
                raise SecAggError(f"{cid}'s keys are not signed by its RSA key: refusing the roster")
            self.neighbours[cid] = entry
        self.roster = {"threshold": t, "weight": weight, "total": total, "clients": clients, "clip": clip,
                       "x": {str(k): int(v) for k, v in xs.items()}}
        holders = {cid: self.roster["x"][cid] for cid in [*self.neighbours, self.client_id]}
        mask_shares = secagg.split(self.mask_private, list(holders.values()), t)
        self_shares = secagg.split(self.self_mask, list(holders.values()), t)
        self.held[self.client_id] = (mask_shares[holders[self.client_id]], self_shares[holders[self.client_id]])
        sealed = {}
        for cid, entry in self.neighbours.items():
            key = secagg.agree(self.share_private, bytes.fromhex(entry["share_key"]), "share", self.context)
            plaintext = secagg.share_plaintext(self.client_id, cid, mask_shares[holders[cid]],
                                               self_shares[holders[cid]])
            sealed[cid] = base64.b64encode(secagg.seal(key, plaintext, self._aad(self.client_id, cid))).decode()
        return self._signed("shares", shares=sealed)

    def _aad(self, sender: str, recipient: str) -> bytes:
        return f"meshfed secagg share {self.context} {sender} {recipient}".encode()

    def on_shares(self, routed: dict[str, Any]) -> None:
        """Open the shares our neighbours sent us; one that does not open ends our part in the round."""
        shares = routed.get("shares")
        if not isinstance(shares, dict) or not set(shares) <= set(self.neighbours):
            raise SecAggError("routed shares must come from our neighbours")
        for sender, sealed in shares.items():
            key = secagg.agree(self.share_private, bytes.fromhex(self.neighbours[sender]["share_key"]), "share",
                               self.context)
            try:
                data = base64.b64decode(str(sealed), validate=True)
            except ValueError:
                raise SecAggError(f"the share from {sender} is not base64") from None
            self.held[sender] = secagg.read_share_plaintext(secagg.unseal(key, data, self._aad(sender,
                                                            self.client_id)), sender, self.client_id)
        self.shared = sorted(shares)
        if len(self.shared) + 1 < self.roster["threshold"]:
            raise SecAggError(f"{len(self.shared)} neighbours shared keys; the threshold is "
                              f"{self.roster['threshold']}")

    def quantised(self, delta: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Our update clipped, weighted n_u / W and quantised into the ring, flat in the model's sorted names (the
        plaintext input, which never leaves the client); and how many coordinates were clipped."""
        r = self.roster
        scale = secagg.ring_scale(r["clip"], r["clients"])
        quantised, clipped = secagg.quantise(delta, r["weight"] / r["total"], r["clip"], scale, rng)
        flat = secagg.flatten(quantised, {name: (quantised[name].shape, "<u4") for name in sorted(quantised)})
        audit(f"{self.run_id}-{self.round}-{self.client_id}.input", lambda: flat)
        return flat, clipped

    def mask(self, flat: np.ndarray) -> np.ndarray:
        """Our input plus our self-mask and our pairwise masks with the neighbours that shared keys (a copy)."""
        masked = flat.copy()
        secagg.add_mask(masked, secagg.prg(self.self_mask, flat.size))
        for cid in self.shared:
            seed = secagg.agree(self.mask_private, bytes.fromhex(self.neighbours[cid]["mask_key"]), "mask",
                                self.context)
            secagg.add_mask(masked, secagg.prg(seed, flat.size), secagg.pair_sign(self.client_id, cid))
        return masked

    def masked_input(self, delta: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[dict[str, np.ndarray],
                                                                                               int]:
        """What we send: (our masked input as uint32 arrays of the model's names and shapes, coordinates clipped)."""
        flat, clipped = self.quantised(delta, rng)
        spec = {name: (delta[name].shape, "<u4") for name in sorted(delta)}
        return secagg.split_flat(self.mask(flat), spec), clipped

    def on_reveal(self, request: dict[str, Any]) -> dict[str, Any]:
        """The shares the server may have: survivors' self-mask shares, dropped clients' mask-key shares."""
        survivors, dropped = set(request.get("survivors") or []), set(request.get("dropped") or [])
        mine = set(self.shared) | {self.client_id}
        if survivors & dropped:
            raise SecAggError(f"{sorted(survivors & dropped)} are named both survivors and dropped: refusing to "
                              "reveal both of their secrets")
        if not dropped & mine <= set(self.shared) or self.client_id in dropped:
            raise SecAggError("the dropped clients must be neighbours that shared keys (and not us)")
        if len(survivors & mine) < self.roster["threshold"]:
            raise SecAggError(f"{len(survivors & mine)} of our neighbourhood survived; fewer than the threshold "
                              f"{self.roster['threshold']}: revealing nothing")
        return self._signed("reveal",
                            self_mask={cid: format(self.held[cid][1], "x") for cid in sorted(survivors & mine)},
                            mask_key_shares={cid: format(self.held[cid][0], "x") for cid in sorted(dropped & mine)})
