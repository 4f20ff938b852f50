"""Enrollment: a client proves that it holds its private key before it may connect on /fl.

1. GET /api/challenge answers a challenge `nonce.issued_at.mac`, the mac an HMAC under this process's
   secret: the server keeps nothing per challenge it hands out.
2. The client connects with a Registration (shared/protocol.py) as its Socket.IO auth, signed with its
   RSA key: the challenge, its id, its public key and its example count.
   Edges (app/edge.py) share one secret, derived from the admin token, and remember redeemed challenges
   in Redis: a client may fetch its challenge from one edge and register at another (nginx moves it when an
   edge fails or is marked down), and a challenge is still redeemed once in the whole tier.
3. admit() refuses, with a stable reason, unless: the enrollment token is right; the challenge is this
   process's, under CHALLENGE_SECONDS old and not used before; the key is RSA 2048-4096 bits with
   e = 65537; the signature verifies with that key. Pinning the key to the id (first registration wins)
   and refusing a second live session are the caller's (app/fl.py), with the store and the registry.

Reasons: bad_registration (auth not a valid Registration), protocol_version, bad_enrollment_token,
bad_challenge, bad_public_key, bad_signature; and, from the caller, key_mismatch, already_connected,
rate_limited.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from typing import Any, Callable

from shared import crypto, frames
from shared.errors import RegistrationRefused, UpdateRefused
from shared.protocol import MAX_EXAMPLES, PROTOCOL_VERSION, Registration

CHALLENGE_SECONDS = 60.0  # a challenge must be redeemed this soon after it was issued


class Enrollment:
    """Issues challenges and admits registrations; thread-safe."""

    def __init__(self, enrollment_token: str, secret: bytes | None = None,
                 once: Callable[[str, float], bool] | None = None):
        self._token = enrollment_token.encode()
        self._secret = secret or secrets.token_bytes(32)
        self._once = once  # shared across processes (an edge tier): True the first time a challenge is redeemed
        self._lock = threading.Lock()
        self._redeemed: dict[str, float] = {}  # challenge -> when it stops being fresh anyway

    def _mac(self, nonce: str, issued: str) -> str:
        return hmac.new(self._secret, f"{nonce}.{issued}".encode(), hashlib.sha256).hexdigest()[:32]

    def challenge(self, now: float | None = None) -> str:
        nonce, issued = secrets.token_urlsafe(18), str(int(time.time() if now is None else now))
        return f"{nonce}.{issued}.{self._mac(nonce, issued)}"

    def _redeem(self, challenge: str, now: float) -> None:
        """Refuse a challenge this process did not issue, a stale one, or one already used."""
        parts = challenge.split(".")
        if len(parts) != 3 or not (parts[1].isascii() and parts[1].isdigit()) or \
                not hmac.compare_digest(parts[2].encode(), self._mac(*parts[:2]).encode()):
            raise RegistrationRefused("bad_challenge", "the challenge is not this server's; GET /api/challenge "
                                                       "again (the server may have restarted)")
        issued = int(parts[1])
        if not issued - 5 <= now <= issued + CHALLENGE_SECONDS:  # 5 s for clocks read by different threads
            raise RegistrationRefused("bad_challenge", f"the challenge is over {CHALLENGE_SECONDS:.0f}s old; "
                                                       "GET /api/challenge again")
        expires = issued + CHALLENGE_SECONDS
        if self._once is not None:
            if not self._once(challenge, expires - now + 5):
                raise RegistrationRefused("bad_challenge", "the challenge was used before; GET /api/challenge again")
            return
        with self._lock:
            if len(self._redeemed) > 256:  # forget challenges that are stale anyway
                self._redeemed = {c: t for c, t in self._redeemed.items() if t >= now}
            if challenge in self._redeemed:
                raise RegistrationRefused("bad_challenge", "the challenge was used before; GET /api/challenge again")
            self._redeemed[challenge] = expires

    def admit_auth(self, auth: Any) -> tuple[Registration, str]:
        """A Socket.IO connect's auth as a Registration, admitted: (it, its key's fingerprint); RegistrationRefused
        (bad_registration, or admit()'s reasons) otherwise."""
        try:
            registration = frames.decode(Registration, auth)
        except UpdateRefused as exc:
            raise RegistrationRefused("bad_registration", f"{exc.args[0].removeprefix('malformed: ')}; "
                                      "this client may be older than the server") from None
        if not 0 < registration.num_examples <= MAX_EXAMPLES:
            raise RegistrationRefused("bad_registration", f"num_examples must be in 1..{MAX_EXAMPLES}")
        return registration, self.admit(registration)

    def admit(self, registration: Registration, now: float | None = None) -> str:
        """Check a registration; returns the key's fingerprint or raises RegistrationRefused."""
        r, now = registration, time.time() if now is None else now
        if r.protocol != PROTOCOL_VERSION:
            raise RegistrationRefused("protocol_version", f"this server speaks {PROTOCOL_VERSION}, the client "
                                                          f"{r.protocol!r}: upgrade the client")
        if not hmac.compare_digest(r.enrollment_token.encode(), self._token):
            raise RegistrationRefused("bad_enrollment_token", "pass the server's enrollment token "
                                                              "(--enrollment-token-file or MESHFED_ENROLLMENT_TOKEN)")
        try:
            key = crypto.load_public_key(r.public_key)
        except ValueError as exc:
            raise RegistrationRefused("bad_public_key", f"{exc}; send a PEM RSA public key") from None
        if not crypto.verify(key, r.canonical_bytes(), r.signature):
            raise RegistrationRefused("bad_signature", "the registration is not signed by the key it carries")
        self._redeem(r.challenge, now)  # after the signature: only a key holder can use a challenge up
        return crypto.fingerprint(r.public_key)
