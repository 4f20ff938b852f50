"""RSA keys, RSA-PSS/SHA-256 signatures over canonical bytes, and key fingerprints.

A thin wrapper over `cryptography`; nothing here invents crypto.
"""
from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

KEY_BITS = 2048         # the floor the design sets; load_public_key refuses smaller keys
MAX_KEY_BITS = 4096     # and larger ones: verifying costs grow with the key, and the server pays them
PUBLIC_EXPONENT = 65537
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


def generate_key(bits: int = KEY_BITS) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=bits)


def load_or_create_key(key_dir: str | Path, name: str) -> rsa.RSAPrivateKey:
    """The private key in key_dir/<name>.pem, created (mode 0600) on first use."""
    path = Path(key_dir) / f"{name}.pem"
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path} does not hold an RSA private key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = path.with_suffix(".pem.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.replace(tmp, path)
    return key


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public_key(pem: str) -> rsa.RSAPublicKey:
    """Parse a PEM public key; ValueError unless it is RSA with KEY_BITS..MAX_KEY_BITS bits and e = 65537
    (a huge key or exponent would make every check of a forged signature against it expensive)."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a PEM public key this server reads ({type(exc).__name__})") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"public key is {type(key).__name__.removeprefix('_')}, not RSA")
    if not KEY_BITS <= key.key_size <= MAX_KEY_BITS:
        raise ValueError(f"RSA key is {key.key_size} bits; {KEY_BITS} to {MAX_KEY_BITS} are accepted")
    if key.public_numbers().e != PUBLIC_EXPONENT:
        raise ValueError(f"RSA public exponent must be {PUBLIC_EXPONENT}")
    return key


def fingerprint(pem: str) -> str:
    """SHA-256 of the DER public key, as 'SHA256:' + hex in groups of 4 (what people compare)."""
    der = load_public_key(pem).public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.sha256(der).hexdigest()
    return "SHA256:" + ":".join(digest[i:i + 4] for i in range(0, len(digest), 4))


def sign(key: rsa.RSAPrivateKey, message: bytes) -> str:
    """Base64 RSA-PSS/SHA-256 signature of message."""
    return base64.b64encode(key.sign(message, _PSS, hashes.SHA256())).decode()


def verify(public_key: rsa.RSAPublicKey, message: bytes, signature_b64: str) -> bool:
    """True iff signature_b64 is a valid RSA-PSS/SHA-256 signature of message."""
    try:
        public_key.verify(base64.b64decode(signature_b64, validate=True), message, _PSS, hashes.SHA256())
        return True
    except (InvalidSignature, ValueError):
        return False
