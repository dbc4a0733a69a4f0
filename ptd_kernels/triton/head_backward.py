"""Backward sweep of the output layer: gradients of hidden, weight and bias from per-row coefficients.

Math (SPEC §2; every loss of the library reduces to it). With the student logits

    z[n, v] = (hidden[n] · weight[v] + bias[v]) / τ,        p[n, v] = exp(z[n, v] − lse[n])

and per-row coefficients given by the caller,

    dz[n, v] = p[n, v] · (row_coef[n] + logit_coef[n] · (z[n, v] − logit_shift[n])) + target_coef[n] · [v = targets[n]]
               + Σ_m sparse_coef[n, m] · [v = sparse_ids[n, m]]
    grad_hidden = dz @ weight / τ,   grad_weight = dzᵀ @ hidden / τ,   grad_bias = Σ_n dz[n, :] / τ.

Examples: log-prob of the target (row_coef = −g, target_coef = g), entropy (logit_coef = −g,
logit_shift = Σ_v p z: the shift is subtracted per element, so that a huge mean logit does not
swallow the O(1) row coefficient), the Top-K JSD (row_coef = g·c for its dense part, and its
support terms as sparse_ids / sparse_coef: M ids per row with their coefficients).

How: one program per (BLOCK_N rows × BLOCK_V vocabulary) tile. It recomputes the logits tile
(a loop over H), forms dz in registers, then loops over H again and atomically adds
dz @ weight-tile into a float32 grad_hidden and dzᵀ @ hidden-tile into a float32 grad_weight
(the scheme of Apple's cut-cross-entropy). Nothing of size N×V is ever allocated; the extra
memory is the float32 accumulators of the gradients (cast to the input dtype at the end).

The sparse terms are added into the dz tile before its dot products (``add_sparse_terms``), so
that a dense part and a sparse part of one logit cancel in dz first, at |dz| magnitude, and not
after both have been multiplied by a possibly huge hidden row. With the ids sorted ascending per
row, each program binary-searches, per row, the slots whose ids fall in its column range and
loops over at most the largest such count in the tile (not over all M slots).

Dtypes: float32, bfloat16, float16 (fp32 accumulation) and float64 (fp64 accumulation; tl.dot
and atomic_add on float64 are exact under the interpreter, not yet measured on a GPU). float32
dots use IEEE fp32 unless torch.backends.cuda.matmul.allow_tf32 is set, as torch does.

The jit helpers ``tile_ids``, ``logits_tile`` and ``accumulate_head_grads`` are shared with the
other output-layer kernels (``jsd.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch

# Tiles sized for an H100 (BLOCK_N × BLOCK_V fp32 logits tile in registers, 64-wide H steps);
# float64 has no tensor cores and twice the register footprint, so it takes smaller tiles.
BLOCK_N = 64
BLOCK_V = 128
BLOCK_H = 64
GROUP_N = 8  # row-tiles that share one sweep of weight tiles (L2 reuse)
NUM_WARPS = 8
FP64_TILES = (32, 64, 32)
FP64_NUM_WARPS = 4

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------------------------
# jit helpers shared by the output-layer kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def tile_ids(N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_N: tl.constexpr):
    """(row-tile, vocab-tile) of this program, grouped so GROUP_N row tiles reuse each weight tile."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows
    return pid_n, pid_v


@triton.jit
def logits_tile(
    x_ptr, w_ptr, b_ptr, scale,
    offs_n, offs_v, mask_n, mask_v, K,
    stride_xn, stride_xk, stride_wv, stride_wk,
    HAS_BIAS: tl.constexpr, DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """(x[offs_n] @ w[offs_v]ᵀ + b[offs_v]) · scale as a [BLOCK_N, BLOCK_V] tile in scale's dtype.

    Out-of-range rows/columns come out finite (their operands load as 0); callers mask them.
    """
    # tl.dot accumulates float64 operands in float64 and everything else in float32.
    if x_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_n[:, None] * stride_xn + offs_k[None, :] * stride_xk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        # The weight tile is loaded transposed ([BLOCK_K, BLOCK_V]) so the dot needs no tl.trans.
        wt = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_v[None, :] * stride_wv,
                     mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        if DOT_UPCAST:
            x = x.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(x, wt, acc, input_precision=PRECISION)
    z = acc.to(scale.dtype)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_v, mask=mask_v, other=0.0)
        z = z + b.to(scale.dtype)[None, :]
    return z * scale


@triton.jit
def accumulate_head_grads(
    dz, x_ptr, w_ptr, gx_ptr, gw_ptr, gb_ptr,
    offs_n, offs_v, mask_n, mask_v, K,
    stride_xn, stride_xk, stride_wv, stride_wk,
    NEED_X_GRAD: tl.constexpr, NEED_W_GRAD: tl.constexpr, NEED_B_GRAD: tl.constexpr,
    DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Atomically add dz @ w → gx[offs_n], dzᵀ @ x → gw[offs_v] and Σ_n dz → gb[offs_v].

    ``dz`` is the [BLOCK_N, BLOCK_V] tile of ∂L/∂(hidden·weightᵀ + bias) (already divided by τ
    and zero outside the valid rows/columns). gx, gw are contiguous [·, K] accumulators.
    """
    if NEED_B_GRAD:
        tl.atomic_add(gb_ptr + offs_v, tl.sum(dz, axis=0), mask=mask_v, sem="relaxed")
    # The gradient dots run in the operands' dtype (bf16 tensor cores on a GPU), like torch's
    # backward of a bf16 linear layer, with fp32 accumulation.
    dz_op = dz.to(w_ptr.dtype.element_ty)
    if DOT_UPCAST:
        dz_op = dz_op.to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if NEED_X_GRAD:
            w = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_k[None, :] * stride_wk,
                        mask=mask_v[:, None] & mask_k[None, :], other=0.0)
            if DOT_UPCAST:
                w = w.to(tl.float32)
            gx = tl.dot(dz_op, w, input_precision=PRECISION)
            tl.atomic_add(gx_ptr + offs_n[:, None] * K + offs_k[None, :], gx,
                          mask=mask_n[:, None] & mask_k[None, :], sem="relaxed")
        if NEED_W_GRAD:
            x = tl.load(x_ptr + offs_n[:, None] * stride_xn + offs_k[None, :] * stride_xk,
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if DOT_UPCAST:
                x = x.to(tl.float32)
            gw = tl.dot(tl.trans(dz_op), x, input_precision=PRECISION)
            tl.atomic_add(gw_ptr + offs_v[:, None] * K + offs_k[None, :], gw,
                          mask=mask_v[:, None] & mask_k[None, :], sem="relaxed")


@triton.jit
def lower_bound_step(lo, hi, ids_ptr, row_base, target, mask_n):
    """One bisection step, per row, of lower_bound(ids[n, :], target) within [lo, hi)."""
    open_rows = mask_n & (lo < hi)
    mid = (lo + hi) // 2
    mid_id = tl.load(ids_ptr + row_base + mid, mask=open_rows, other=0)
    below = open_rows & (mid_id < target)
    return tl.where(below, mid + 1, lo), tl.where(open_rows & (mid_id >= target), mid, hi)


@triton.jit
def add_sparse_terms(
    dz, ids_ptr, coef_ptr, offs_n, offs_v, mask_n, v_start, M, search_steps,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """dz + Σ_m coef[n, m]·[ids[n, m] = v] over the [BLOCK_N, BLOCK_V] tile (rows offs_n, columns offs_v).

    ``ids``/``coef`` are contiguous [N, M] arrays whose ids are sorted ascending per row (ids
    outside [0, V) match no column; a repeated id adds each of its coefficients). The columns
    of the tile are [v_start, v_start + BLOCK_V). ``search_steps`` ≥ ⌈log2(M + 1)⌉.
    """
    row_base = offs_n * M  # int64 (offs_n is int64): N·M may exceed 2^31
    v_end = v_start + BLOCK_V
    # Per row: first = #slots with id < v_start, last = #slots with id < v_end (two lower bounds).
    first = tl.zeros((BLOCK_N,), dtype=tl.int32)
    first_hi = tl.zeros((BLOCK_N,), dtype=tl.int32) + M
    last = tl.zeros((BLOCK_N,), dtype=tl.int32)
    last_hi = tl.zeros((BLOCK_N,), dtype=tl.int32) + M
    for _ in range(search_steps):
        first, first_hi = lower_bound_step(first, first_hi, ids_ptr, row_base, v_start, mask_n)
        last, last_hi = lower_bound_step(last, last_hi, ids_ptr, row_base, v_end, mask_n)
    count = tl.where(mask_n, last - first, 0)
    for j in range(0, tl.max(count, axis=0)):
        slot = first + j
        mask_slot = mask_n & (slot < last)
        ids = tl.load(ids_ptr + row_base + slot, mask=mask_slot, other=-1)
        coef = tl.load(coef_ptr + row_base + slot, mask=mask_slot, other=0.0)
        hit = mask_slot[:, None] & (offs_v[None, :] == ids[:, None])
        dz += tl.where(hit, coef[:, None], 0.0)
    return dz


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _head_backward_kernel(
    x_ptr, w_ptr, b_ptr, scalars_ptr,
    lse_ptr, row_coef_ptr, logit_coef_ptr, logit_shift_ptr, targets_ptr, target_coef_ptr,
    sparse_ids_ptr, sparse_coef_ptr,
    gx_ptr, gw_ptr, gb_ptr,
    N, V, H, M, search_steps,
    stride_xn, stride_xh, stride_wv, stride_wh,
    HAS_BIAS: tl.constexpr, HAS_LOGIT_COEF: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_SPARSE: tl.constexpr,
    NEED_X_GRAD: tl.constexpr, NEED_W_GRAD: tl.constexpr, NEED_B_GRAD: tl.constexpr,
    DOT_UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid_n, pid_v = tile_ids(N, V, BLOCK_N, BLOCK_V, GROUP_N)
    # int64 offsets: N·H and V·H may exceed 2^31.
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    inv_tau = tl.load(scalars_ptr)

    z = logits_tile(x_ptr, w_ptr, b_ptr, inv_tau, offs_n, offs_v, mask_n, mask_v, H,
                    stride_xn, stride_xh, stride_wv, stride_wh,
                    HAS_BIAS, DOT_UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    # Padding rows/columns have finite but meaningless z (exp(bias/τ) may even overflow there):
    # give them log p = 0 here and zero their dz below, before any reduction.
    valid = mask_n[:, None] & mask_v[None, :]
    p = tl.exp(tl.where(valid, z - lse[:, None], 0.0))
    coef = tl.load(row_coef_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    if HAS_LOGIT_COEF:
        shift = tl.load(logit_shift_ptr + offs_n, mask=mask_n, other=0.0)
        coef = coef + tl.load(logit_coef_ptr + offs_n, mask=mask_n, other=0.0)[:, None] * (z - shift[:, None])
    dz = p * coef
    if HAS_TARGETS:
        target = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1)
        target_coef = tl.load(target_coef_ptr + offs_n, mask=mask_n, other=0.0)
        dz += tl.where(offs_v[None, :] == target[:, None], target_coef[:, None], 0.0)
    if HAS_SPARSE:
        dz = add_sparse_terms(dz, sparse_ids_ptr, sparse_coef_ptr, offs_n, offs_v, mask_n,
                              pid_v.to(tl.int64) * BLOCK_V, M, search_steps, BLOCK_N, BLOCK_V)
    dz = tl.where(valid, dz * inv_tau, 0.0)

    accumulate_head_grads(dz, x_ptr, w_ptr, gx_ptr, gw_ptr, gb_ptr,
                          offs_n, offs_v, mask_n, mask_v, H,
                          stride_xn, stride_xh, stride_wv, stride_wh,
                          NEED_X_GRAD, NEED_W_GRAD, NEED_B_GRAD, DOT_UPCAST, PRECISION, BLOCK_H)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of tl.dot for ``dtype`` operands: fp32 follows torch's TF32 switch."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    if dtype == torch.float64:
        return "ieee"
    return "tf32"  # the default; it does not apply to 16-bit operands


def default_tiles(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps) for ``dtype``."""
    if dtype == torch.float64:
        return (*FP64_TILES, FP64_NUM_WARPS)
    return BLOCK_N, BLOCK_V, BLOCK_H, NUM_WARPS


def resolve_tiles(dtype, block_n, block_v, block_h):
    """Default tiles with the caller's overrides; checks tl.dot's constraints (powers of 2, ≥ 16)."""
    bn, bv, bh, warps = default_tiles(dtype)
    tiles = (block_n or bn, block_v or bv, block_h or bh)
    for name, size in zip(("block_n", "block_v", "block_h"), tiles):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of 2 and at least 16, got {size}")
    return (*tiles, warps)


def check_operand(name: str, tensor: torch.Tensor, ndim: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(tensor.shape)}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {tensor.dtype}")


def check_row_vector(name: str, tensor: torch.Tensor, n: int, device: torch.device) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device}")


def check_sparse(ids: torch.Tensor, coef: torch.Tensor, n: int, device: torch.device) -> None:
    """sparse_ids / sparse_coef: [n, M] tensors on ``device``, integer ids and float coefficients."""
    for name, tensor in (("sparse_ids", ids), ("sparse_coef", coef)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2 or tensor.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n}, M), got {tuple(tensor.shape)}")
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device}, expected {device}")
    if ids.shape != coef.shape:
        raise ValueError(f"sparse_ids {tuple(ids.shape)} and sparse_coef {tuple(coef.shape)} must have one shape")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"sparse_ids must be int64, got {ids.dtype}")
    if not coef.dtype.is_floating_point:
        raise TypeError(f"sparse_coef must be a float tensor, got {coef.dtype}")


def check_head(hidden, weight, bias, temperature, prefix=""):
    """Validates one output layer; returns (N, V, H)."""
    check_operand(prefix + "hidden", hidden, 2)
    check_operand(prefix + "weight", weight, 2)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{prefix}hidden ({hidden.dtype}) and {prefix}weight ({weight.dtype}) must share a dtype")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{prefix}hidden has H={hidden.shape[1]} but {prefix}weight has H={weight.shape[1]}")
    if weight.device != hidden.device:
        raise ValueError(f"{prefix}weight is on {weight.device}, {prefix}hidden on {hidden.device}")
    if bias is not None:
        check_operand(prefix + "bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{prefix}bias has {bias.shape[0]} entries, {prefix}weight has V={weight.shape[0]}")
        if bias.device != hidden.device:
            raise ValueError(f"{prefix}bias is on {bias.device}, {prefix}hidden on {hidden.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return hidden.shape[0], weight.shape[0], hidden.shape[1]


def finish_grads(gx, gw, gb, hidden, weight, bias):
    """Casts the accumulators to the dtypes of the inputs (None stays None)."""
    return (
        None if gx is None else gx.to(hidden.dtype),
        None if gw is None else gw.to(weight.dtype),
        None if gb is None else gb.to(bias.dtype),
    )


def head_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    lse: torch.Tensor,
    row_coef: torch.Tensor,
    logit_coef: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    target_coef: torch.Tensor | None = None,
    logit_shift: torch.Tensor | None = None,
    sparse_ids: torch.Tensor | None = None,
    sparse_coef: torch.Tensor | None = None,
    *,
    need_hidden_grad: bool = True,
    need_weight_grad: bool = True,
    need_bias_grad: bool = True,
    block_n: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
):
    """Gradients of Σ_n,v dz[n, v]·z[n, v] w.r.t. hidden [N, H], weight [V, H] and bias [V] (see module doc).

    Args:
        hidden, weight, bias: the student output layer (bias may be None); same dtype for
            hidden and weight, one of float32 / bfloat16 / float16 / float64.
        temperature: τ > 0.
        lse: [N] logsumexp of z (float32, float64 for float64 inputs; other dtypes are converted).
        row_coef, logit_coef, target_coef: [N] per-row coefficients of dz (logit_coef may be None).
        logit_shift: [N] subtracted from z inside the logit_coef term (None: 0).
        targets: [N] int64 ids in [0, V) with ``target_coef`` (or None). Masked rows must be
            removed by the caller (an id outside [0, V) simply matches no column).
        sparse_ids, sparse_coef: [N, M] ids (int64) and coefficients of the sparse terms (or
            None), in any order within a row; a row with fewer terms pads with coefficient 0
            (any id) or with an id outside [0, V). Repeated ids add up.
        need_hidden_grad, need_weight_grad, need_bias_grad: skip the gradients not wanted.
        block_n, block_v, block_h: tile overrides (powers of 2, ≥ 16), for tests and tuning.

    Returns:
        (grad_hidden [N, H] in hidden.dtype or None, grad_weight [V, H] in weight.dtype or None,
         grad_bias [V] in bias.dtype, or None when bias is None or not needed).
    """
    n, v, h = check_head(hidden, weight, bias, temperature)
    device = hidden.device
    acc_dtype = _launch.accumulator_dtype(hidden.dtype)
    for name, vec in (("lse", lse), ("row_coef", row_coef), ("logit_coef", logit_coef),
                      ("target_coef", target_coef), ("logit_shift", logit_shift)):
        if vec is not None:
            check_row_vector(name, vec, n, device)
    if (targets is None) != (target_coef is None):
        raise ValueError("targets and target_coef must be given together")
    if targets is not None:
        check_row_vector("targets", targets, n, device)
        if targets.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"targets must be int64, got {targets.dtype}")
    if (sparse_ids is None) != (sparse_coef is None):
        raise ValueError("sparse_ids and sparse_coef must be given together")
    if sparse_ids is not None:
        check_sparse(sparse_ids, sparse_coef, n, device)

    need_bias_grad = need_bias_grad and bias is not None
    gx = torch.zeros((n, h), dtype=acc_dtype, device=device) if need_hidden_grad else None
    gw = torch.zeros((v, h), dtype=acc_dtype, device=device) if need_weight_grad else None
    gb = torch.zeros((v,), dtype=acc_dtype, device=device) if need_bias_grad else None
    if n == 0 or v == 0 or not (need_hidden_grad or need_weight_grad or need_bias_grad):
        return finish_grads(gx, gw, gb, hidden, weight, bias)

    def vec(t):
        return t.to(acc_dtype).contiguous()

    lse_, row_coef_ = vec(lse), vec(row_coef)
    scalars = torch.tensor([1.0 / float(temperature)], dtype=acc_dtype, device=device)
    dummy = scalars  # stands in for absent optional pointers (never read: constexpr flags)
    has_sparse = sparse_ids is not None and sparse_ids.shape[1] > 0
    m = sparse_ids.shape[1] if has_sparse else 0
    if has_sparse:  # the kernel binary-searches each row: ids ascending, coefficients alongside
        sparse_ids, order = sparse_ids.to(torch.int64).sort(dim=1)
        sparse_ids, sparse_coef = sparse_ids.contiguous(), vec(sparse_coef.gather(1, order))
    bn, bv, bh, warps = resolve_tiles(hidden.dtype, block_n, block_v, block_h)
    grid = (triton.cdiv(n, bn) * triton.cdiv(v, bv),)
    _head_backward_kernel[grid](
        hidden, weight, bias if bias is not None else dummy, scalars,
        lse_, row_coef_,
        vec(logit_coef) if logit_coef is not None else dummy,
        vec(logit_shift) if logit_shift is not None else torch.zeros_like(lse_),
        targets.to(torch.int64).contiguous() if targets is not None else dummy,
        vec(target_coef) if target_coef is not None else dummy,
        sparse_ids if has_sparse else dummy, sparse_coef if has_sparse else dummy,
        gx if gx is not None else dummy, gw if gw is not None else dummy, gb if gb is not None else dummy,
        n, v, h, m, m.bit_length(),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, HAS_LOGIT_COEF=logit_coef is not None, HAS_TARGETS=targets is not None,
        HAS_SPARSE=has_sparse,
        NEED_X_GRAD=need_hidden_grad, NEED_W_GRAD=need_weight_grad, NEED_B_GRAD=need_bias_grad,
        DOT_UPCAST=_launch.dot_upcast(hidden.dtype), PRECISION=dot_precision(hidden.dtype),
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, GROUP_N=GROUP_N,
        num_warps=warps,
    )
    return finish_grads(gx, gw, gb, hidden, weight, bias)
