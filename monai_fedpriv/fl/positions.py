"""Position blocks of sparse updates: which coordinates of a tensor are shared, in the smallest of four encodings
(int32 indices, a bitmap, a deflated bitmap, or Golomb-Rice coded gaps). Used by :mod:`monai_fedpriv.fl.codec`,
whose docstring gives the sizes."""

from __future__ import annotations

import struct
import zlib

import numpy as np

from monai_fedpriv.errors import UpdateError

__all__ = ["decode_positions", "encode_positions"]


def _rice_encode(mask: np.ndarray) -> bytes:
    """Gaps between shared indices, Golomb-Rice coded (parameter ``k`` chosen to minimise the size).

    Layout: ``k`` (1 byte) | unary stream length in bytes (uint32) | unary quotients | ``k``-bit remainders. The
    quotient ``(gap - 1) >> k`` is written as that many 1-bits and a 0-bit; streams are packed LSB first.
    """
    idx = np.flatnonzero(mask).astype(np.int64)
    gaps = np.diff(idx, prepend=-1) - 1  # >= 0
    costs = [int((gaps >> k).sum()) + gaps.size * (1 + k) for k in range(32)]
    k = int(np.argmin(costs))
    quot = gaps >> k
    ends = np.cumsum(quot + 1) - 1  # position of each terminating 0-bit
    unary = np.ones(int(ends[-1]) + 1 if gaps.size else 0, dtype=np.uint8)
    unary[ends] = 0
    unary_bytes = np.packbits(unary, bitorder="little").tobytes()
    rem = ((gaps[:, None] >> np.arange(k - 1, -1, -1)) & 1).astype(np.uint8).reshape(-1)
    return struct.pack("<BI", k, len(unary_bytes)) + unary_bytes + np.packbits(rem, bitorder="little").tobytes()


def _rice_decode(block: bytes, count: int, numel: int, key: str) -> np.ndarray:
    if len(block) < 5:
        raise UpdateError(f"corrupt gap block for tensor {key!r}.")
    k, n_unary = struct.unpack_from("<BI", block, 0)
    unary = np.unpackbits(np.frombuffer(block, dtype=np.uint8, count=n_unary, offset=5), bitorder="little")
    ends = np.flatnonzero(unary == 0)[:count]
    rem_bits = np.unpackbits(np.frombuffer(block, dtype=np.uint8, offset=5 + n_unary), bitorder="little")
    if ends.size != count or k > 31 or rem_bits.size < count * k:
        raise UpdateError(f"corrupt gap block for tensor {key!r}.")
    quot = np.diff(ends, prepend=-1) - 1
    rem = rem_bits[: count * k].reshape(count, k).astype(np.int64) @ (1 << np.arange(k - 1, -1, -1, dtype=np.int64))
    return np.cumsum((quot.astype(np.int64) << k) + rem + 1) - 1


def encode_positions(mask: np.ndarray) -> tuple[str, bytes]:
    """The smallest of the position encodings of a flat boolean mask."""
    if mask.size >= 2**31:
        raise UpdateError(f"tensor with {mask.size} elements is too large for int32 indices.")
    bitmap = np.packbits(mask, bitorder="little").tobytes()
    options = [
        ("indices", np.flatnonzero(mask).astype("<i4").tobytes()),
        ("bitmap", bitmap),
        ("bitmap_deflate", zlib.compress(bitmap, 9)),
        ("gaps_rice", _rice_encode(mask)),
    ]
    return min(options, key=lambda o: len(o[1]))  # first wins on ties


def decode_positions(encoding: str, block: bytes, numel: int, count: int, key: str) -> np.ndarray:
    """The flat boolean mask of ``numel`` coordinates (``count`` of them shared) from its position block."""
    if encoding in ("indices", "gaps_rice"):
        if encoding == "indices":
            idx = np.frombuffer(block, dtype="<i4").astype(np.int64)
        else:
            idx = _rice_decode(block, count, numel, key)
        if idx.size and (idx.min() < 0 or idx.max() >= numel or np.any(np.diff(idx) <= 0)):
            raise UpdateError(f"corrupt index block for tensor {key!r}.")
        mask = np.zeros(numel, dtype=bool)
        mask[idx] = True
        return mask
    if encoding == "bitmap_deflate":
        try:
            block = zlib.decompress(block)
        except zlib.error as exc:
            raise UpdateError(f"corrupt compressed bitmap for tensor {key!r}: {exc}") from exc
    if encoding in ("bitmap", "bitmap_deflate"):
        if len(block) != (numel + 7) // 8:
            raise UpdateError(f"bitmap of tensor {key!r} has {len(block)} bytes, expected {(numel + 7) // 8}.")
        return np.unpackbits(np.frombuffer(block, dtype=np.uint8), count=numel, bitorder="little").astype(bool)
    raise UpdateError(f"unknown position encoding {encoding!r} for tensor {key!r}.")
