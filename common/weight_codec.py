"""How weight tensors are checked and, in delta mode, encoded against an earlier step (numpy only).

Checksums are xxh3_64 of a tensor's raw bytes (the C xxHash library through ``xxhash``): about
20 GB/s on one core here against 2.3 GB/s for zlib's CRC32, and it releases the GIL, so verifying
a step costs little next to receiving it.

A delta is exact: the XOR of the new tensor's raw bytes with the same tensor of a base step
(bits that did not change are zero), its bytes grouped by significance (sign and exponent bytes
of floats barely move under a small update, so they form long zero runs), compressed with zstd.
The receiver XORs it back onto its own copy of the base and checks the result against the
manifest's checksum, so a wrong base or a damaged delta is refused, never loaded.
"""

from __future__ import annotations

import numpy as np
import xxhash

from rlbus.bus import BusError

NamedArray = tuple[str, np.ndarray, str]
"""(parameter name, array, logical dtype such as ``float32`` or ``bfloat16``)."""

RAW = "raw"
XOR_ZSTD = "xor-zstd"
ENCODINGS = (RAW, XOR_ZSTD)
ZSTD_LEVEL = 1  # level 1 compresses ~700 MB/s here and higher levels barely shrink XORed floats
_WORD = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class WeightsCorrupt(BusError):
    """A fetched step did not match its manifest; nothing of it may be loaded."""


def checksum(array: np.ndarray) -> int:
    """xxh3_64 of the array's raw bytes (C order)."""
    return xxhash.xxh3_64_intdigest(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def hasher() -> xxhash.xxh3_64:
    """An incremental :func:`checksum`: ``update`` it with a tensor's bytes piece by piece."""
    return xxhash.xxh3_64()


def _zstd():
    try:
        import zstandard
    except ImportError as exc:  # the trainer and inference extras install it
        raise BusError("delta weight transfer needs the zstandard package (pip install zstandard)") from exc
    return zstandard


def _words(array: np.ndarray) -> np.ndarray:
    """The raw bytes of ``array`` as unsigned words of its item size (bytes for odd sizes)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    word = _WORD.get(flat.dtype.itemsize)
    return flat.view(word) if word is not None else flat.view(np.uint8)


def encode_delta(new: np.ndarray, base: np.ndarray) -> np.ndarray | None:
    """``new`` as a compressed XOR against ``base`` (uint8), or None when that is not smaller
    than ``new`` itself or the two do not have the same shape and dtype."""
    if new.shape != base.shape or new.dtype != base.dtype or new.nbytes == 0:
        return None
    xor = np.bitwise_xor(_words(new), _words(base))
    width = xor.dtype.itemsize
    # Byte j of every word together: bytes of equal significance compress as one run.
    shuffled = np.ascontiguousarray(xor.view(np.uint8).reshape(-1, width).T)
    packed = _zstd().ZstdCompressor(level=ZSTD_LEVEL).compress(shuffled)
    if len(packed) >= new.nbytes:
        return None
    return np.frombuffer(packed, dtype=np.uint8)


def decode_delta(packed: np.ndarray, base: np.ndarray, name: str) -> np.ndarray:
    """The tensor that ``packed`` (from :func:`encode_delta`) encodes against ``base``; raises
    WeightsCorrupt naming ``name`` when it does not decode to exactly ``base``'s size."""
    zstandard = _zstd()
    data = np.ascontiguousarray(packed).reshape(-1).view(np.uint8)
    try:
        # Checked before decompressing: a hostile header must not make us allocate its claim.
        size = zstandard.frame_content_size(data)
        if size != base.nbytes:
            raise WeightsCorrupt(f"delta of tensor {name} decodes to {size} bytes, the base has {base.nbytes}")
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=base.nbytes)
    except zstandard.ZstdError as exc:
        raise WeightsCorrupt(f"delta of tensor {name} does not decompress: {exc}") from exc
    if len(raw) != base.nbytes:
        raise WeightsCorrupt(f"delta of tensor {name} decoded to {len(raw)} bytes, the base has {base.nbytes}")
    base_words = _words(base)
    width = base_words.dtype.itemsize
    xor = np.ascontiguousarray(np.frombuffer(raw, dtype=np.uint8).reshape(width, -1).T).view(base_words.dtype)
    return np.bitwise_xor(xor.reshape(-1), base_words).view(base.dtype).reshape(base.shape)
