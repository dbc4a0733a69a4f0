"""Top-K keys: one int64 per logit whose integer order is the top-K order of docs/method.md §2.

key = (order-preserving int32 bits of the float32 logit) << 32 | (2^32 − 1 − id): a larger logit
has a larger key, and of two equal logits the smaller id has the larger key, so "the k largest keys"
is the top-k with ties to the smaller id, and keys are distinct. −0.0 and +0.0 tie; NaN sorts above
+inf. The same keys as ``rowmath.pack_topk_keys`` and the Triton backend's row statistics.

``SENTINEL`` is below every real key (empty slots, padding columns).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton._launch import check_triton_for_cublas

check_triton_for_cublas(triton.__version__, hasattr(tl, "topk"))  # select_top's tl.topk: on first use

SENTINEL = -(2**63)
KEY_SENTINEL = tl.constexpr(SENTINEL)  # the same, for kernels


@triton.jit
def pack_keys(z, ids):
    """Keys of logits ``z`` [R, C] at column ids ``ids`` [C] (any integer dtype)."""
    z32 = z.to(tl.float32)
    z32 = tl.where(z32 == 0.0, 0.0, z32)  # −0.0 → +0.0
    bits = z32.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)  # negative floats order backwards
    low = tl.full((), 4294967295, tl.int64) - ids.to(tl.int64)
    return (ordered << 32) | low[None, :]


@triton.jit
def kth_key(top, k, K_PAD: tl.constexpr):
    """The k-th largest key of each row of ``top`` [R, K_PAD] (sorted descending)."""
    slot = tl.arange(0, K_PAD)
    return tl.max(tl.where(slot[None, :] == k - 1, top, KEY_SENTINEL), axis=1)


_RANK_CHUNK = tl.constexpr(64)


@triton.jit
def select_top(list_ptr, count, mask_r, K_PAD: tl.constexpr, CAP: tl.constexpr, BLOCK_R: tl.constexpr,
               RANK_SELECT: tl.constexpr):
    """The K_PAD largest keys [BLOCK_R, K_PAD], descending, of each row's list of ``count`` keys at
    ``list_ptr`` [BLOCK_R, 1] (rows out of ``mask_r`` give sentinels).

    On a GPU: ``tl.topk`` of the whole list (a sorting network). Under the interpreter, which runs a
    sorting network element by element, by ranking, in chunks of the list: rank(x) = how many keys of
    the row are larger; the key of rank r < K_PAD goes to slot r. Real keys are distinct; equal
    sentinels share a rank, and the slots no key claims hold the sentinel, as the network leaves them.
    """
    if RANK_SELECT:
        slot = tl.arange(0, K_PAD)[None, None, :]
        top = tl.full((BLOCK_R, K_PAD), KEY_SENTINEL, tl.int64)
        for i0 in range(0, CAP, _RANK_CHUNK):
            offs_i = i0 + tl.arange(0, _RANK_CHUNK)
            keys_i = tl.load(list_ptr + offs_i[None, :], mask=mask_r[:, None] & (offs_i[None, :] < count[:, None]),
                             other=KEY_SENTINEL)
            rank = tl.zeros((BLOCK_R, _RANK_CHUNK), tl.int32)
            for j0 in range(0, CAP, _RANK_CHUNK):
                offs_j = j0 + tl.arange(0, _RANK_CHUNK)
                keys_j = tl.load(list_ptr + offs_j[None, :],
                                 mask=mask_r[:, None] & (offs_j[None, :] < count[:, None]), other=KEY_SENTINEL)
                rank += tl.sum((keys_j[:, None, :] > keys_i[:, :, None]).to(tl.int32), axis=2)
            top = tl.maximum(top, tl.max(tl.where(rank[:, :, None] == slot, keys_i[:, :, None], KEY_SENTINEL), axis=1))
        return top
    offs = tl.arange(0, CAP)
    keys = tl.load(list_ptr + offs[None, :], mask=mask_r[:, None] & (offs[None, :] < count[:, None]),
                   other=KEY_SENTINEL)
    return tl.topk(keys, K_PAD)


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64, float32 logits) of keys."""
    ids = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    ordered = keys >> 32  # arithmetic shift: the signed int32 range
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(torch.int32)
    return ids, bits.view(torch.float32)
