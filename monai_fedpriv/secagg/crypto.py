"""The cryptographic pieces of secure aggregation (Bonawitz et al. 2017), from the ``cryptography`` package.

- key agreement: X25519 key pairs; a shared secret stretched by HKDF-SHA256 with a label naming its use, the run's
  session and round and the two sites (so one agreement never yields the same key for two purposes or rounds);
- authenticated encryption of the share packets one site routes to another through the server: AES-GCM with the
  packet's session, round, sender and receiver as associated data (a packet replayed in another round, or
  addressed to someone else, does not decrypt);
- the mask generator: AES-256 in counter mode from a 32-byte seed, read as ``bits``-bit integers.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["KeyPair", "agree", "mask", "open_packet", "private_bytes", "public_bytes", "seal_packet"]

_RAW = serialization.Encoding.Raw


class KeyPair:
    """One X25519 key pair (OS entropy)."""

    def __init__(self, private: X25519PrivateKey | None = None) -> None:
        self.private = private or X25519PrivateKey.generate()
        self.public = public_bytes(self.private)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def agree(private: X25519PrivateKey | bytes, peer_public: bytes, label: str) -> bytes:
    """32 bytes both ends of a pair derive alike: X25519 of one's private and the other's public key, through
    HKDF-SHA256 with ``label`` (use, session, round, the pair in a fixed order)."""
    key = private if isinstance(private, X25519PrivateKey) else X25519PrivateKey.from_private_bytes(private)
    if len(peer_public) != 32:
        raise ValueError("an X25519 public key has 32 bytes.")
    shared = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label.encode()).derive(shared)


def seal_packet(key: bytes, plaintext: bytes, header: str) -> bytes:
    """``nonce || AES-GCM(plaintext)`` bound to ``header`` (associated data)."""
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, header.encode())


def open_packet(key: bytes, packet: bytes, header: str) -> bytes:
    """The plaintext of a sealed packet, or ``ValueError`` when the key, the header or a byte is not the one sealed."""
    if len(packet) < 12 + 16:
        raise ValueError("a sealed packet is shorter than its nonce and tag.")
    try:
        return AESGCM(key).decrypt(packet[:12], packet[12:], header.encode())
    except InvalidTag:
        raise ValueError(f"a share packet failed authentication ({header}): replayed, misaddressed or altered.") \
            from None  # fmt: skip


_WIDTHS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def mask(seed: bytes, size: int, bits: int) -> np.ndarray:
    """``size`` pseudo-random integers in ``[0, 2^bits)`` (``uint64``) from a 32-byte ``seed``: AES-256-CTR's
    keystream, read 1, 2, 4 or 8 bytes per value (the fewest that hold ``bits``), cut to ``bits`` (1 to 62)."""
    if len(seed) != 32:
        raise ValueError("a mask seed has 32 bytes.")
    if not 1 <= bits <= 62:
        raise ValueError(f"bits must be in [1, 62], got {bits}.")
    width = next(w for w in (1, 2, 4, 8) if bits <= 8 * w)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    stream = encryptor.update(bytes(width * size)) + encryptor.finalize()
    return np.frombuffer(stream, dtype=_WIDTHS[width]).astype(np.uint64) & np.uint64((1 << bits) - 1)
