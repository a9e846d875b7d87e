"""Bit packing of B-bit integer codes (B = 2..8) into bytes, so a B-bit weight takes B/8 bytes.

Codes are the symmetric integers c ∈ [−(2^(B−1)−1), 2^(B−1)−1] of round-to-nearest quantization.
They are stored offset as unsigned u = c + 2^(B−1) ∈ [1, 2^B − 1], which fits in B bits.

Layout (little-endian bit stream): the flattened codes are padded with zeros (u = 0, a value no
real code takes) to a multiple of 8 and cut into blocks of 8 codes. Block j is the 8B-bit integer

    v_j = Σ_{i=0..7} u_{8j+i} · 2^(B·i),

written as its B bytes, least significant first. So code n occupies bits [B·n, B·n + B) of the
stream, and n codes take ceil(n/8)·B bytes (exactly n·B/8 when 8 | n). For B = 8 this is simply
one byte per code (no padding). Everything is vectorised torch integer arithmetic, processed in chunks so the
temporary int64 buffers stay bounded for large matrices.
"""

from __future__ import annotations

import torch

from ..errors import InputError

_CHUNK_BLOCKS = 1 << 20  # blocks of 8 codes per chunk (8 Mi codes, 64 MiB of int64 temporaries)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise InputError(f"bits must be an integer in 2..8, got {bits!r}")


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes taken by ``numel`` packed ``bits``-bit codes: ceil(numel/8)·bits (numel for 8 bits)."""
    _check_bits(bits)
    if bits == 8:
        return int(numel)
    return -(-int(numel) // 8) * bits


def _to_unsigned(codes: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    flat = codes.detach().reshape(-1).to("cpu")
    if flat.numel() and (int(flat.min()) < -qmax or int(flat.max()) > qmax):
        raise ValueError(f"codes out of range for {bits}-bit symmetric quantization (±{qmax})")
    return (flat.to(torch.int16) + (qmax + 1)).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed codes (any integer dtype, values in ±(2^(bits−1)−1)) into a 1-D uint8 tensor
    of :func:`packed_nbytes` bytes (layout in the module docstring). The shape is not stored."""
    _check_bits(bits)
    u = _to_unsigned(codes, bits)
    if bits == 8:
        return u
    n = u.numel()
    n_blocks = -(-n // 8)
    pad = n_blocks * 8 - n
    if pad:
        u = torch.cat([u, torch.zeros(pad, dtype=torch.uint8)])
    if 8 % bits == 0:  # 2 or 4 bits: whole codes per byte, plain uint8 arithmetic
        per = 8 // bits
        cols = u.reshape(-1, per)
        out = cols[:, 0].clone()
        for i in range(1, per):
            out |= cols[:, i] << (bits * i)
        return out
    cols_all = u.reshape(n_blocks, 8)
    out = torch.empty(bits, n_blocks, dtype=torch.uint8)
    for start in range(0, n_blocks, _CHUNK_BLOCKS):
        blk = cols_all[start:start + _CHUNK_BLOCKS].T.to(torch.int64)  # (8, m)
        v = blk[0].clone()
        for i in range(1, 8):
            v |= blk[i] << (bits * i)  # ≤ 56 bits: no overflow in int64
        for j in range(bits):
            out[j, start:start + _CHUNK_BLOCKS] = ((v >> (8 * j)) & 0xFF).to(torch.uint8)
    return out.T.contiguous().reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` signed codes as a 1-D int8 tensor."""
    _check_bits(bits)
    qmax = 2 ** (bits - 1) - 1
    data = packed.detach().reshape(-1).to("cpu")
    if data.dtype != torch.uint8:
        raise InputError(f"packed codes must be uint8, got {data.dtype}")
    expected = packed_nbytes(numel, bits)
    if data.numel() != expected:
        raise InputError(f"packed codes hold {data.numel()} bytes, expected {expected} for {numel} "
                         f"{bits}-bit codes (corrupted file?)")
    mask = (1 << bits) - 1
    if bits == 8:
        u = data
    elif 8 % bits == 0:
        per = 8 // bits
        u = torch.empty(data.numel(), per, dtype=torch.uint8)
        for i in range(per):
            u[:, i] = (data >> (bits * i)) & mask
        u = u.reshape(-1)[:numel]
    else:
        n_blocks = expected // bits
        rows = data.reshape(n_blocks, bits)
        u = torch.empty(8, n_blocks, dtype=torch.uint8)
        for start in range(0, n_blocks, _CHUNK_BLOCKS):
            r = rows[start:start + _CHUNK_BLOCKS].T.to(torch.int64)  # (bits, m)
            v = r[0].clone()
            for j in range(1, bits):
                v |= r[j] << (8 * j)
            for i in range(8):
                u[i, start:start + _CHUNK_BLOCKS] = ((v >> (bits * i)) & mask).to(torch.uint8)
        u = u.T.reshape(-1)[:numel]
    codes = u.to(torch.int16) - (qmax + 1)
    if codes.numel() and (int(codes.min()) < -qmax or int(codes.max()) > qmax):
        raise InputError(f"packed {bits}-bit codes decode out of range (corrupted file?)")
    return codes.to(torch.int8)
