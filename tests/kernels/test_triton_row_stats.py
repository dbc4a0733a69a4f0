"""The forward sweep kernel (ptd_kernels/triton/row_stats.py) against dense float64 torch.

Each test materializes z = (h Wᵀ + b) / τ in float64 (the kernel never does) and compares lse,
the mean logit, the target logit and the top-K (ids by descending logit, ties → smaller id,
i.e. a stable descending sort). What every backend must do is tests/kernels/test_conformance.py;
this file holds what is particular to this kernel: tile, segment and merge-strategy overrides, extreme
rows, strides, the launcher's checks and the in-kernel keys. Shapes are small because Triton runs under
its interpreter on a CPU; tiles are chosen so that they do not divide V or H and that several vocabulary
segments meet in the merge (raised to the GPU's minimum of 16 on a GPU: tests/_devices.py).
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from _checks import tolerance
from _devices import tiles as tile_sizes

from ptd_kernels.backends.base import Head
from ptd_kernels.backends.triton.row_stats import MAX_K, _pack_keys, row_stats
from ptd_kernels.rowmath import pack_topk_keys

TAU = 0.7
SMALL_TILES = tile_sizes(block_n=4, block_v=32, block_h=32)  # 300 % 32 ≠ 0, 48 % 32 ≠ 0
F32_TOL = tolerance(torch.float32)

pytestmark = pytest.mark.backend("triton")


def dense_logits(hidden, weight, bias, temperature=TAU):
    """float64 z from the inputs as given (bf16 inputs are already rounded: compare to those)."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    return z / temperature


def make_inputs(n, h, v, dtype=torch.float32, bias=True, scale=0.3, device="cpu"):
    hidden = torch.randn(n, h).to(device, dtype)
    weight = (torch.randn(v, h) * scale).to(device, dtype)
    b = torch.randn(v).to(device, dtype) if bias else None
    targets = torch.randint(0, v, (n,)).to(device)
    return hidden, weight, b, targets


def check_stats(r, z, targets, *, rtol, atol, with_mean=True):
    lse = torch.logsumexp(z, dim=1)
    torch.testing.assert_close(r.lse.double(), lse, rtol=rtol, atol=atol)
    if with_mean:
        mean = (torch.softmax(z, dim=1) * z).sum(1)
        torch.testing.assert_close(r.mean_logit.double(), mean, rtol=rtol, atol=atol)
    if targets is not None:
        torch.testing.assert_close(r.target_logit.double(), z.gather(1, targets[:, None])[:, 0], rtol=rtol, atol=atol)


def check_topk(r, z, k, *, exact=True, atol=1e-5):
    """exact: ids equal the stable descending sort (the tie rule); otherwise (low precision
    inputs, where near-ties may legitimately swap) the float64 logits at the returned ids must
    equal the sorted top-k logits, which a wrong set or a wrong order would break."""
    expected = torch.sort(z, dim=1, descending=True, stable=True)
    ids, logits = r.topk_indices, r.topk_logits
    assert ids.shape == (z.shape[0], k) and ids.dtype == torch.int64
    assert logits.shape == (z.shape[0], k) and logits.dtype == torch.float32
    assert ((ids >= 0) & (ids < z.shape[1])).all()
    assert (ids.sort(dim=1).values.diff(dim=1) != 0).all(), "duplicate ids in a row"
    if exact:
        assert torch.equal(ids, expected.indices[:, :k])
    else:
        torch.testing.assert_close(z.gather(1, ids), expected.values[:, :k], rtol=0, atol=atol)
    # The returned logits are the float32 logits at the returned ids.
    torch.testing.assert_close(logits.double(), z.gather(1, ids), rtol=F32_TOL["rtol"], atol=atol)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("k,num_segments", [(0, 3), (7, 3), (32, 1), (60, None)])
def test_float32_matches_dense(bias, k, num_segments, device):
    hidden, weight, b, targets = make_inputs(12, 48, 300, bias=bias, device=device)
    r = row_stats(Head(hidden, weight, b, TAU), targets=targets, k=k, num_segments=num_segments, **SMALL_TILES)
    z = dense_logits(hidden, weight, b)
    check_stats(r, z, targets, **F32_TOL)
    assert r.lse.dtype == torch.float32 and r.lse.shape == (12,)
    if k:
        check_topk(r, z, k)
    else:
        assert r.topk_indices is None and r.topk_logits is None


def test_default_tiles_and_segments(device):
    hidden, weight, b, targets = make_inputs(12, 48, 300, device=device)
    r = row_stats(Head(hidden, weight, b, TAU), targets=targets, k=100)
    z = dense_logits(hidden, weight, b)
    check_stats(r, z, targets, **F32_TOL)
    check_topk(r, z, 100)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_float64_on_rounded_inputs(dtype, device):
    hidden, weight, b, targets = make_inputs(12, 48, 300, dtype=dtype, device=device)
    r = row_stats(Head(hidden, weight, b, TAU), targets=targets, k=20, num_segments=4, **SMALL_TILES)
    z = dense_logits(hidden, weight, b)
    assert r.lse.dtype == torch.float32
    check_stats(r, z, targets, **F32_TOL)  # float32 sums of products of the rounded inputs
    check_topk(r, z, 20, exact=False, atol=1e-4)


def _tie_inputs(n, v, bias, device):
    """Two thirds of the vocabulary has zero weight rows: their logits are exactly b/τ (one
    constant, 0 without bias), spread over every tile and segment. Five rows score above
    that constant and the rest below, so the top-k is those five, then the smallest tied ids."""
    hidden = torch.randn(n, 24).abs() + 0.1
    weight = -(torch.randn(v, 24).abs() * 0.3)
    perm = torch.randperm(v)
    tied, above = perm[: 2 * v // 3], perm[2 * v // 3 : 2 * v // 3 + 5]
    weight[tied] = 0.0
    weight[above] = -weight[above]
    b = torch.full((v,), 0.25) if bias else None
    targets = torch.randint(0, v, (n,))
    return (*(None if t is None else t.to(device) for t in (hidden, weight, b, targets, tied, above)),)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("merge", ["rank", "insert"])
def test_exact_ties_go_to_the_smaller_id(bias, merge, device):
    if merge == "rank":
        n, v, k, tiles = 10, 300, 40, SMALL_TILES
    else:  # the insertion loop is slow under the interpreter: smaller problem, tiny tiles
        n, v, k, tiles = 4, 150, 16, tile_sizes(block_n=2, block_v=16, block_h=16)
    hidden, weight, b, targets, tied, above = _tie_inputs(n, v, bias, device)
    z = dense_logits(hidden, weight, b)
    # The cut falls inside the tie group: the expected top-k is the 5 larger ids, then the
    # smallest tied ids (not merely "some" tied ids).
    above_sorted = above[z[:, above].sort(dim=1, descending=True).indices]
    smallest_tied = tied.sort().values[: k - 5].expand(n, k - 5)
    expected = torch.cat([above_sorted, smallest_tied], dim=1)
    r = row_stats(Head(hidden, weight, b, TAU), targets=targets, k=k, num_segments=4, topk_merge=merge, **tiles)
    check_stats(r, z, targets, **F32_TOL)
    check_topk(r, z, k)
    assert torch.equal(r.topk_indices, expected)


@pytest.mark.parametrize("merge", ["rank", "insert"])
def test_whole_row_tied_and_monotone_rows(merge, device):
    # Row 0: zero hidden and constant bias → all V logits equal: top-k = 0..k-1.
    # Row 1: logits descending with the id → after the first tile every tile is skipped.
    # Row 2: logits ascending with the id → every tile replaces the running top-k.
    v, k = 90, 12
    hidden = torch.zeros(3, 8, device=device)
    weight = torch.zeros(v, 8, device=device)
    weight[:, 0] = torch.linspace(1.0, -1.0, v)
    hidden[1, 0] = 1.0
    hidden[2, 0] = -1.0
    b = torch.full((v,), 0.5, device=device)
    r = row_stats(Head(hidden, weight, b, TAU), targets=None, k=k, num_segments=2, topk_merge=merge,
                  **tile_sizes(block_n=2, block_v=16, block_h=16))
    z = dense_logits(hidden, weight, b)
    check_topk(r, z, k)
    ids = r.topk_indices.cpu()
    assert torch.equal(ids[0], torch.arange(k))
    assert torch.equal(ids[1], torch.arange(k))
    assert torch.equal(ids[2], torch.arange(v - 1, v - 1 - k, -1))
    torch.testing.assert_close(r.lse[0].double().cpu(), torch.tensor(0.5 / TAU + math.log(v), dtype=torch.float64),
                               **F32_TOL)  # a float32 sum of v equal terms


def test_insert_and_rank_merges_agree(device):
    """The GPU's merge against the interpreter's: K_PAD < BLOCK_V, K_PAD = BLOCK_V and K_PAD > BLOCK_V
    (32 > 16: the first tile fills half of the running top-K)."""
    hidden, weight, b, targets = make_inputs(3, 20, 70, device=device)
    tiles = dict(tile_sizes(block_n=2, block_v=16, block_h=16), num_segments=3)
    for k in (3, 16, 21):
        a = row_stats(Head(hidden, weight, b, TAU), targets=targets, k=k, topk_merge="insert", **tiles)
        c = row_stats(Head(hidden, weight, b, TAU), targets=targets, k=k, topk_merge="rank", **tiles)
        assert torch.equal(a.topk_indices, c.topk_indices)
        assert torch.equal(a.topk_logits, c.topk_logits)
        check_topk(a, dense_logits(hidden, weight, b), k)


def test_huge_logits_do_not_overflow(device):
    # Logits of order 1e4 in one row (exp would overflow without the running max), with the
    # row's maximum in the last segment so the segment merge has to rescale by e^{m_s − M}.
    hidden, weight, b, targets = make_inputs(4, 32, 300, device=device)
    hidden[2] *= 3e3
    b[290] = 2e4
    r = row_stats(Head(hidden, weight, b, TAU), targets=targets, k=10, num_segments=3, **SMALL_TILES)
    z = dense_logits(hidden, weight, b)
    assert z[2].abs().max() > 1e4
    assert torch.isfinite(r.lse).all() and torch.isfinite(r.mean_logit).all()
    check_stats(r, z, targets, rtol=2e-6, atol=1e-5)
    check_topk(r, z, 10, atol=1e-2)
    assert r.topk_indices[:, 0].eq(290).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_nan_or_inf_in_one_row_stays_in_that_row(bad, device):
    hidden, weight, b, targets = make_inputs(6, 24, 100, device=device)
    hidden[3, 5] = bad
    r = row_stats(Head(hidden, weight, b, TAU), targets=targets, k=4, num_segments=2, **SMALL_TILES)
    assert torch.isnan(r.lse[3]) and torch.isnan(r.mean_logit[3])
    good = torch.tensor([0, 1, 2, 4, 5], device=device)
    z = dense_logits(hidden[good], weight, b)
    sub = r.take_rows(good)
    check_stats(sub, z, targets[good], **F32_TOL)
    check_topk(sub, z, 4)


def test_strided_inputs(device):
    # A column-sliced hidden and a transposed (column-major) weight: the kernel uses strides.
    base = torch.randn(7, 64, device=device)
    hidden = base[:, ::2]
    weight = (torch.randn(32, 150, device=device) * 0.3).T  # [150, 32], strides (1, 150)
    b = torch.randn(300, device=device)[::2]
    targets = torch.randint(0, 150, (7,), device=device)
    r = row_stats(Head(hidden, weight, b, TAU), targets=targets, k=6, num_segments=2, **SMALL_TILES)
    z = dense_logits(hidden, weight, b)
    check_stats(r, z, targets, **F32_TOL)
    check_topk(r, z, 6)


def test_bad_arguments(device):
    """Shapes and dtypes the kernel reads (the temperature's value is the public layer's check)."""
    hidden, weight, b, targets = make_inputs(3, 8, 20, device=device)
    with pytest.raises(ValueError, match="k"):
        row_stats(Head(hidden, weight, b, TAU), targets=targets, k=21)
    with pytest.raises(ValueError, match="k"):
        row_stats(Head(torch.randn(3, 8, device=device), torch.randn(MAX_K + 10, 8, device=device), None, TAU),
                  targets=None, k=MAX_K + 1)
    with pytest.raises(TypeError, match="dtype"):
        row_stats(Head(hidden.double(), weight, b, TAU), targets=targets, k=2)
    with pytest.raises(TypeError, match="hidden"):
        row_stats(Head(hidden.int(), weight.int(), None, TAU), targets=targets, k=2)
    with pytest.raises(TypeError, match="targets"):
        row_stats(Head(hidden, weight, b, TAU), targets=targets.int(), k=2)
    with pytest.raises(ValueError, match="bias"):
        row_stats(Head(hidden, weight, b[:5], TAU), targets=targets, k=2)


@triton.jit
def _pack_keys_probe(z_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    keys = _pack_keys(tl.load(z_ptr + offs)[None, :], offs)
    tl.store(out_ptr + offs[None, :], keys)


def test_in_kernel_keys_match_rowmath(device):
    # The tie rule lives in the keys: they must be bit-identical to rowmath.pack_topk_keys,
    # including −0.0 (ties +0.0), ±inf, subnormals and the extreme finite floats.
    f32 = torch.finfo(torch.float32)
    z = torch.tensor(
        [0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, f32.max, -f32.max, f32.tiny / 4,
         -f32.tiny / 4, 1.0, 1e-30, -1e-30, 3.5, -3.5],
        dtype=torch.float32,
    )
    out = torch.empty(16, dtype=torch.int64, device=device)
    _pack_keys_probe[(1,)](z.to(device), out, BLOCK=16)
    assert torch.equal(out.cpu(), pack_topk_keys(z[None])[0])
