"""Index codecs: store which elements of a tensor a sparse delta changed, in as few bytes as possible.

A sparse delta's values cost what the child network costs (`p` of the model); the positions of the
changed elements come on top, and stored naively (int32 per element) they can cost as much as the values
themselves. This module keeps that overhead close to the entropy bound of a random mask, and it is the
one place that reads untrusted index arrays from a file, so it decodes them defensively.

Size. A bitmap costs 1 bit per element of the tensor, Elias-Fano about `2 + log2(1/p)` bits per changed
element, plain int32 32 bits; `choose_encoding` takes the smallest for each tensor (a bitmap at p=0.3,
Elias-Fano below ~0.2), which stays within ~15% of the entropy of a random mask. Plain indices are kept
as the simplest valid form, and `all` (every element changed) needs no array at all.

Robust decoding. `decode_indices` checks the dtype, shape, byte count, padding bits, count, range and
strict order of what it reads, so a corrupted or hostile file raises `DeltaError` instead of yielding
indices that would write outside the tensor or twice into one element.
"""

from __future__ import annotations

import numpy as np

from childtune.delta.errors import DeltaError

ENCODINGS = ("all", "bitmap", "indices", "elias_fano")
"""Ways to store sorted element indices; `all` (every element) needs no array, the others one each."""


def _ef_split(n: int, k: int) -> tuple[int, int]:
    """Elias-Fano parameters: low bits per index and length of the unary-coded upper-bits bitmap."""
    low = max(0, (n // k).bit_length() - 1)
    return low, k + ((n - 1) >> low) + 1


def index_sizes(n: int, k: int) -> dict[str, int]:
    """Bytes each encoding needs for `k` sorted indices out of `n`; `all` only when nothing is implied."""
    low, upper = _ef_split(n, k)
    sizes = {
        "bitmap": -(-n // 8),
        "indices": k * (4 if n <= 2**31 else 8),
        "elias_fano": -(-upper // 8) + -(-(k * low) // 8),
    }
    if k == n:
        sizes["all"] = 0
    return sizes


def choose_encoding(name: str, n: int, k: int) -> str:
    """Smallest encoding, counting a stored array's share of the safetensors header (~70 bytes)."""
    sizes = index_sizes(n, k)
    return min(sizes, key=lambda e: (sizes[e] + (e != "all") * (70 + len(name)), ENCODINGS.index(e)))


def encode_indices(encoding: str, indices: np.ndarray, n: int) -> np.ndarray | None:
    """The one array that stores sorted `indices` out of `n` (None for `all`)."""
    if encoding == "all":
        return None
    if encoding == "bitmap":
        bits = np.zeros(n, dtype=bool)
        bits[indices] = True
        return np.packbits(bits)
    if encoding == "indices":
        return indices.astype(np.int32 if n <= 2**31 else np.int64)
    k = indices.size  # Elias-Fano: upper bits in unary (a bitmap), then `low` plain bits per index
    low, upper = _ef_split(n, k)
    high = np.zeros(upper, dtype=bool)
    high[(indices >> low) + np.arange(k)] = True
    lows = np.empty((k, low), dtype=np.uint8)
    for j in range(low):
        lows[:, j] = (indices >> (low - 1 - j)) & 1
    return np.concatenate([np.packbits(high), np.packbits(lows.reshape(-1))])


def _unpack(name: str, packed: np.ndarray, nbits: int) -> np.ndarray:
    """Bits of a packed array of exactly the right length with zero padding (strict: no hidden data)."""
    if packed.size != -(-nbits // 8):
        raise DeltaError(f"{name}: packed bits have {packed.size} bytes, expected {-(-nbits // 8)}")
    bits = np.unpackbits(packed)
    if bits[nbits:].any():
        raise DeltaError(f"{name}: non-zero padding bits")
    return bits[:nbits]


def decode_indices(name: str, encoding: str, array: np.ndarray | None, n: int, k: int) -> np.ndarray:
    """Sorted int64 indices, validated: count `k`, strictly increasing, all inside `[0, n)`."""
    if encoding == "all":
        if k != n:
            raise DeltaError(f"{name}: encoding 'all' means {n} elements, file has {k}")
        return np.arange(n, dtype=np.int64)
    wanted = (np.int32, np.int64) if encoding == "indices" else (np.uint8,)
    if array is None or array.dtype not in wanted or array.ndim != 1:
        raise DeltaError(f"{name}: {encoding} must be a 1-d array of {' or '.join(t.__name__ for t in wanted)}")
    if encoding == "bitmap":
        indices = np.flatnonzero(_unpack(name, array, n)).astype(np.int64)
    elif encoding == "indices":
        indices = array.astype(np.int64)
    else:
        low, upper = _ef_split(n, k) if k else (0, 0)
        split = -(-upper // 8)
        ones = np.flatnonzero(_unpack(name, array[:split], upper))
        if ones.size != k:
            raise DeltaError(f"{name}: {ones.size} indices for {k} elements")
        lows = _unpack(name, array[split:], k * low).reshape(k, low)
        indices = (ones - np.arange(k)).astype(np.int64) << low
        for j in range(low):
            indices |= lows[:, j].astype(np.int64) << (low - 1 - j)
    if indices.size != k:
        raise DeltaError(f"{name}: {indices.size} indices for {k} elements")
    if k and (indices.min() < 0 or indices.max() >= n):
        raise DeltaError(f"{name}: index out of range for {n} elements")
    if k > 1 and not (np.diff(indices) > 0).all():
        raise DeltaError(f"{name}: indices are not strictly increasing (unsorted or duplicate)")
    return indices
