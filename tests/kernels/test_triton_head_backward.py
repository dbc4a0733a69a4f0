"""head_backward (Triton: compiled on a GPU, the interpreter on a CPU) against dense float64 torch on
small shapes: tile overrides, extreme rows, strides, the sparse terms' layout in the tiles, the
launcher's checks. What every backend must do is tests/kernels/test_conformance.py.

Shapes are chosen so that no tile divides them: V = 200 against BLOCK_V ∈ {64, 128}, H = 40
against BLOCK_H ∈ {16, 64}, N = 7 against BLOCK_N ∈ {16, 64}.
"""

from __future__ import annotations

import pytest
import torch
from _checks import TOLERANCE, acc_dtype, assert_rel_close
from _devices import tiles as tile_sizes

from ptd_kernels.backends.base import GradNeeds, Head, HeadGradCoefs, SparseTerms
from ptd_kernels.backends.registry import interpreting
from ptd_kernels.backends.triton.head_backward import head_backward as kernel_head_backward

N, V, H = 7, 200, 40
TAU = 0.7
SMALL_TILES = tile_sizes(block_n=16, block_v=64, block_h=16)  # several V and H steps per program
DEFAULT_TILES: dict = {}

# max |kernel − exact| / max |exact| allowed per input dtype: that of the computation. bf16/fp16 round dz to
# the operand dtype before the gradient dots (as torch's own bf16 backward does).
GRAD_TOL = TOLERANCE

pytestmark = pytest.mark.backend("triton")


def head_backward(hidden, weight, bias, tau, lse, row_coef, logit_coef=None, targets=None, target_coef=None,
                  logit_shift=None, sparse_ids=None, sparse_coef=None, *, need_hidden_grad=True,
                  need_weight_grad=True, need_bias_grad=True, **tiles):
    """The launcher on these tests' flat arguments: sparse_ids/sparse_coef [N, M] name every row."""
    sparse = () if sparse_ids is None else (SparseTerms.every_row(sparse_ids, sparse_coef),)
    coefs = HeadGradCoefs(row_coef, logit_coef, logit_shift, targets, target_coef, sparse)
    needs = GradNeeds(need_hidden_grad, need_weight_grad, need_bias_grad)
    return tuple(kernel_head_backward(Head(hidden, weight, bias, tau), lse, coefs, needs, **tiles))


def make_inputs(dtype, with_bias, n=N, v=V, h=H, device="cpu"):
    hidden = torch.randn(n, h).to(device, dtype)
    weight = (0.3 * torch.randn(v, h)).to(device, dtype)
    bias = torch.randn(v).to(device, dtype) if with_bias else None
    return hidden, weight, bias


def dense_logits(hidden, weight, bias, tau=TAU):
    """float64 logits of the (already rounded) inputs, as detached leaves that require grad."""
    x = hidden.detach().to(torch.float64).clone().requires_grad_()
    w = weight.detach().to(torch.float64).clone().requires_grad_()
    b = None if bias is None else bias.detach().to(torch.float64).clone().requires_grad_()
    z = x @ w.T
    if b is not None:
        z = z + b
    return x, w, b, z / tau


def dense_dz(z, lse, row_coef, logit_coef, targets, target_coef):
    p = (z - lse[:, None]).exp()
    coef = row_coef[:, None] if logit_coef is None else row_coef[:, None] + logit_coef[:, None] * z
    dz = p * coef
    if targets is not None:
        dz[torch.arange(z.shape[0], device=z.device), targets] += target_coef
    return dz


def dense_sparse(v, sparse_ids, sparse_coef):
    """float64 [n, v] with Σ_m coef[n, m] at column ids[n, m] (ids outside [0, v) ignored)."""
    n = sparse_ids.shape[0]
    out = torch.zeros((n, v), dtype=torch.float64, device=sparse_ids.device)
    inside = (sparse_ids >= 0) & (sparse_ids < v)
    rows = torch.arange(n, device=sparse_ids.device)[:, None].expand_as(sparse_ids)
    out.index_put_((rows[inside], sparse_ids[inside]), sparse_coef.to(torch.float64)[inside], accumulate=True)
    return out


def run_and_compare(hidden, weight, bias, coefs, tiles, tol, tau=TAU, sparse=None):
    """The launcher on the inputs' device against the dense formula there (coefficients moved to it)."""
    row_coef, logit_coef, targets, target_coef = (None if t is None else t.to(hidden.device) for t in coefs)
    sparse = None if sparse is None else tuple(t.to(hidden.device) for t in sparse)
    x, w, b, z = dense_logits(hidden, weight, bias, tau)
    z = z.detach()
    lse = z.logsumexp(-1)
    dz = dense_dz(z, lse, row_coef, logit_coef, targets, target_coef)
    acc = acc_dtype(hidden.dtype)
    sparse_ids = sparse_coef = None
    if sparse is not None:
        sparse_ids, sparse_coef = sparse
        dz = dz + dense_sparse(z.shape[1], sparse_ids, sparse_coef)

    def cast(t):
        return None if t is None else t.to(acc)

    gx, gw, gb = head_backward(hidden, weight, bias, tau, cast(lse), cast(row_coef), cast(logit_coef),
                               targets, cast(target_coef), sparse_ids=sparse_ids, sparse_coef=cast(sparse_coef),
                               **tiles)
    assert gx.dtype == acc and gw.dtype == acc
    assert_rel_close(gx, dz @ w.detach() / tau, tol, "grad_hidden")
    assert_rel_close(gw, dz.T @ x.detach() / tau, tol, "grad_weight")
    if bias is None:
        assert gb is None
    else:
        assert gb.dtype == acc
        assert_rel_close(gb, dz.sum(0) / tau, tol, "grad_bias")
    return gx, gw, gb


def random_coefs(n=N, v=V, logit=True, target=True):
    row_coef = torch.randn(n, dtype=torch.float64)
    logit_coef = torch.randn(n, dtype=torch.float64) if logit else None
    targets = torch.randint(0, v, (n,)) if target else None
    target_coef = torch.randn(n, dtype=torch.float64) if target else None
    return row_coef, logit_coef, targets, target_coef


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("tiles", [SMALL_TILES, DEFAULT_TILES], ids=["small_tiles", "default_tiles"])
def test_matches_dense_formula(dtype, with_bias, tiles, device):
    hidden, weight, bias = make_inputs(dtype, with_bias, device=device)
    run_and_compare(hidden, weight, bias, random_coefs(), tiles, GRAD_TOL[dtype])


@pytest.mark.parametrize("logit, target", [(False, False), (True, False), (False, True)])
def test_optional_coefficients(logit, target, device):
    hidden, weight, bias = make_inputs(torch.float32, True, device=device)
    run_and_compare(hidden, weight, bias, random_coefs(logit=logit, target=target), SMALL_TILES,
                    GRAD_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_logprob_and_entropy_gradients_match_autograd(dtype, with_bias, device):
    """The documented coefficients of log-prob and entropy give torch.autograd's gradients."""
    hidden, weight, bias = make_inputs(dtype, with_bias, device=device)
    targets = torch.randint(0, V, (N,)).to(device)
    g_logp = torch.randn(N, dtype=torch.float64).to(device)
    g_ent = torch.randn(N, dtype=torch.float64).to(device)
    x, w, b, z = dense_logits(hidden, weight, bias)
    logp = z.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    loss = (g_logp * logp[torch.arange(N, device=device), targets]).sum() + (g_ent * entropy).sum()
    loss.backward()

    zd = z.detach()
    lse = zd.logsumexp(-1)
    sum_pz = ((zd - lse[:, None]).exp() * zd).sum(-1)
    acc = acc_dtype(dtype)
    row_coef = -g_logp + g_ent * sum_pz
    gx, gw, gb = head_backward(hidden, weight, bias, TAU, lse.to(acc), row_coef.to(acc), (-g_ent).to(acc),
                               targets, g_logp.to(acc), **SMALL_TILES)
    tol = GRAD_TOL[dtype]
    assert_rel_close(gx, x.grad, tol, "grad_hidden")
    assert_rel_close(gw, w.grad, tol, "grad_weight")
    if with_bias:
        assert_rel_close(gb, b.grad, tol, "grad_bias")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_extreme_rows(dtype, with_bias, device):
    """A row with logits at the 1e4 scale (p is one-hot) and a row of equal logits (p uniform)."""
    hidden, weight, bias = make_inputs(torch.float64, with_bias, device=device)
    hidden[0] *= 1000.0  # |z| ~ 1e4
    hidden[1] = 0.0
    if with_bias:
        # A constant bias keeps row 1 a row of equal logits; at 80/τ, exp(z) of a padding row
        # overflows fp32, which the kernel must mask out rather than multiply by 0.
        bias.fill_(80.0)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    _, _, _, z = dense_logits(hidden, weight, bias)
    assert z[0].abs().max() > 5e3
    assert torch.all(z[1] == z[1, 0])
    # fp32 logits at 1e4 carry ~1e-4 absolute error, i.e. p of the top token carries ~1e-4.
    tol = 1e-11 if dtype == torch.float64 else 2e-3
    gx, _, _ = run_and_compare(hidden, weight, bias, random_coefs(), SMALL_TILES, tol)
    assert torch.isfinite(gx).all()


def test_single_row_and_strided_inputs(device):
    hidden = torch.randn(1, 2 * H, device=device)[:, ::2]  # N = 1, row stride 2H, column stride 2
    weight = (0.3 * torch.randn(H, V, device=device)).T  # [V, H] view with strides (1, V)
    bias = torch.randn(V, device=device)
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    run_and_compare(hidden, weight, bias, random_coefs(n=1), SMALL_TILES, GRAD_TOL[torch.float32])


def test_zero_coefficient_rows_get_zero_gradient(device):
    hidden, weight, bias = make_inputs(torch.float32, True, device=device)
    row_coef, logit_coef, targets, target_coef = random_coefs()
    for coef in (row_coef, logit_coef, target_coef):
        coef[3] = 0.0
    gx, _, _ = run_and_compare(hidden, weight, bias, (row_coef, logit_coef, targets, target_coef),
                               SMALL_TILES, GRAD_TOL[torch.float32])
    assert torch.all(gx[3] == 0)


def test_bad_inputs_are_rejected(device):
    """The launcher checks the shapes and dtypes the kernel reads; values (the temperature, the ids) are
    the public layer's checks, made once per call."""
    hidden, weight, bias = make_inputs(torch.float32, True, device=device)
    lse = torch.zeros(N, device=device)
    coef = torch.zeros(N, device=device)
    with pytest.raises(TypeError, match="hidden"):
        head_backward(hidden.double(), weight, bias, TAU, lse, coef)
    with pytest.raises(ValueError, match="lse"):
        head_backward(hidden, weight, bias, TAU, lse[:-1], coef)
    with pytest.raises(ValueError, match="bias"):
        head_backward(hidden, weight, bias[:-1], TAU, lse, coef)
    with pytest.raises(ValueError, match="block_v"):
        head_backward(hidden, weight, bias, TAU, lse, coef, block_v=48)  # not a power of 2
    with pytest.raises(ValueError, match="targets"):
        head_backward(hidden, weight, bias, TAU, lse, coef, targets=torch.zeros(N, dtype=torch.int64, device=device))
    ids, sparse_coef = torch.zeros((N, 3), dtype=torch.int64), torch.zeros((N, 3))
    with pytest.raises(ValueError, match="targets and target_coef"):
        HeadGradCoefs(coef, targets=torch.zeros(N, dtype=torch.int64))
    with pytest.raises(ValueError, match="coef"):
        SparseTerms.every_row(ids, sparse_coef[:, :2])
    with pytest.raises(ValueError, match="row_index"):
        SparseTerms(torch.arange(N), ids[:-1], sparse_coef[:-1])
    with pytest.raises(TypeError, match="ids"):
        SparseTerms.every_row(ids.float(), sparse_coef)


def test_many_row_tiles(device):
    """N = 150 rows in 16-row tiles: 10 row blocks looped over by the interpreter's 4 programs, each
    sweeping V = 200 in two chunks (the second partial); the vocabulary-owned sweep crosses row chunks."""
    hidden, weight, bias = make_inputs(torch.float32, True, n=150, device=device)
    run_and_compare(hidden, weight, bias, random_coefs(n=150), tile_sizes(block_n=16, block_v=64, block_h=64),
                    GRAD_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segments_of_the_swept_axis(dtype, device):
    """V = 50 columns are one vocabulary block, too few for the interpreter's 4 stand-in SMs: the
    vocabulary-owned sweep splits the N = 40 rows into segments that write partial grad_weight and
    grad_bias, summed by the launcher (the rows-owned sweep does the same with V at N = 7 in the
    other tests); chunk = one tile."""
    from ptd_kernels.backends.triton import _launch

    tiles = dict(tile_sizes(block_n=16, block_v=64, block_h=16), chunk=64)
    sweeps = _launch.grad_sweeps(lambda own_rows: _launch.backward_tiles(dtype, **tiles), 40, 50, H, GradNeeds(),
                                 torch.float32, dtype, device)
    if interpreting():  # a GPU has enough SMs for one program per block: no segments to check there
        assert [s.grid for s in sweeps] == [(3, 1), (1, 3)]
    hidden, weight, bias = make_inputs(dtype, True, n=40, v=50, device=device)
    run_and_compare(hidden, weight, bias, random_coefs(n=40, v=50), tiles, GRAD_TOL[dtype])


# ---------------------------------------------------------------------------- sparse terms in the dz tiles

# With V = 200 and BLOCK_V = 64 the vocabulary tiles are [0, 64), [64, 128), [128, 192) and the
# partial [192, 200). Rows given in no particular order within a row (the launcher sorts them).
_SPARSE_ROWS = [
    [5, 3, 60, 10, 200, 200, 200, 200],  # several ids in the first tile, padded with id V
    [199, 193, 192, 195, -1, -1, -1, -1],  # several ids in the last, partial tile; padding −1
    [200, 200, 200, 200, 200, 200, 200, 200],  # no sparse term (ids V, coefficients 0)
    [0, 63, 64, 127, 128, 191, 192, 199],  # both edges of every tile
    [7, 150, 7, 7, 0, 0, 0, 0],  # a repeated id adds up (padding: id 0 with coefficient 0)
    [-5, 200, 10_000, 3, 3, 3, 3, 3],  # ids outside [0, V) match no column even with a coefficient
    [11, 12, 13, 14, 15, 16, 17, 18],
]


def sparse_terms(n=N, seed=1):
    ids = torch.tensor(_SPARSE_ROWS, dtype=torch.int64)[:n]
    coef = torch.randn(ids.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    coef[0, 4:] = 0.0
    coef[1, 4:] = 0.0
    coef[2] = 0.0
    coef[4, 4:] = 0.0
    coef[5, 3:] = 0.0
    return ids, coef


def test_sparse_terms_reference_layout(device):
    """The torch reference of the sparse terms: the rows above mean what their comments say."""
    ids, coef = sparse_terms()
    dense = dense_sparse(V, ids, coef)
    assert torch.all(dense[2] == 0) and torch.all(dense[5] == 0)
    assert dense[4, 7] == coef[4, 0] + coef[4, 2] + coef[4, 3]
    assert (dense[1, 192:] != 0).sum() == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("tiles", [SMALL_TILES, DEFAULT_TILES], ids=["small_tiles", "default_tiles"])
def test_sparse_terms_in_tiles(dtype, tiles, device):
    """dz = dense part + targets + sparse terms, with the sparse ids spread over tiles as in _SPARSE_ROWS."""
    hidden, weight, bias = make_inputs(dtype, True, device=device)
    run_and_compare(hidden, weight, bias, random_coefs(), tiles, GRAD_TOL[dtype], sparse=sparse_terms())


def test_sparse_terms_alone_and_single_slot(device):
    """Only sparse terms (row_coef 0, no targets), and M = 1 (one slot per row)."""
    hidden, weight, bias = make_inputs(torch.float64, True, device=device)
    zero = (torch.zeros(N, dtype=torch.float64), None, None, None)
    gx, gw, gb = run_and_compare(hidden, weight, bias, zero, SMALL_TILES, GRAD_TOL[torch.float64],
                                 sparse=sparse_terms())
    assert torch.all(gx[2] == 0) and torch.all(gx[5] == 0)  # rows without a term in [0, V)
    ids = torch.tensor([[199], [0], [64], [63], [200], [100], [128]])
    coef = torch.randn(N, 1, dtype=torch.float64)
    run_and_compare(hidden, weight, bias, zero, SMALL_TILES, GRAD_TOL[torch.float64], sparse=(ids, coef))


@pytest.mark.slow
def test_sparse_terms_many_rows_and_random_ids(device):
    """150 rows over 10 row tiles, 21 random (possibly repeated) ids per row, some rows without any."""
    n = 150
    hidden, weight, bias = make_inputs(torch.float32, False, n=n, device=device)
    ids = torch.randint(0, V, (n, 21))
    coef = torch.randn(n, 21, dtype=torch.float64)
    coef[::7] = 0.0
    run_and_compare(hidden, weight, bias, random_coefs(n=n), tile_sizes(block_n=16, block_v=64, block_h=64),
                    GRAD_TOL[torch.float32], sparse=(ids, coef))


def test_sparse_terms_cancel_inside_the_tile(device):
    """A 1e4-scaled hidden row whose p is exactly one-hot at t, with row_coef c and a sparse −c at t:
    dz[0, t] = c·1 − c = 0 exactly when the sparse term is added in the tile, so d weight[t] keeps
    the other rows' small contributions. Contracting the sparse term with hidden separately
    (the former Triton path) sums ±c·1e4 in float32 and loses them: relative error 3e-4 vs 4e-7."""
    tau, t = 0.5, 37  # 1/τ exact in float32
    hidden, weight, _ = make_inputs(torch.float32, False, device=device)
    weight[:, 0] = 0.0
    weight[t, 0] = 2.0 ** -6
    hidden[0] = 0.0
    hidden[0, 0] = 1e4  # z[0, t] = 1e4 / 64 / τ = 312.5 exactly, z[0, v ≠ t] = 0: p[0] one-hot in float32
    row_coef = 0.01 * torch.randn(N, dtype=torch.float64)
    row_coef[0] = 1.0
    ids = torch.full((N, 2), V, dtype=torch.int64)
    coef = torch.zeros(N, 2, dtype=torch.float64)
    ids[0, 0], coef[0, 0] = t, -1.0
    ids[1:, 0], coef[1:, 0] = torch.randint(0, V, (N - 1,)), 0.01 * torch.randn(N - 1, dtype=torch.float64)
    run_and_compare(hidden, weight, None, (row_coef, None, None, None), SMALL_TILES, 1e-6, tau=tau,
                    sparse=(ids, coef))


def test_pad_sparse_merges_triples_per_row(device):
    """Several (row_index, ids, coef) triples, rows named twice or not at all, become one padded
    array per row: ids ascending, padding id V with coefficient 0, zero coefficients dropped."""
    from ptd_kernels.backends.sparse_layout import pad_sparse

    first = SparseTerms(torch.tensor([0, 2]), torch.tensor([[9, 4], [1, 1]]), torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
    second = SparseTerms(torch.tensor([2, 0, 2]), torch.tensor([[0], [5], [7]]), torch.tensor([[4.0], [5.0], [6.0]]))
    ids, coef = pad_sparse(4, 10, [first, second], torch.float64)
    assert ids.tolist() == [[4, 5, 9], [10, 10, 10], [0, 1, 7], [10, 10, 10]]
    assert coef.tolist() == [[2.0, 5.0, 1.0], [0.0, 0.0, 0.0], [4.0, 3.0, 6.0], [0.0, 0.0, 0.0]]
    assert pad_sparse(4, 10, [], torch.float32) is None
    assert pad_sparse(4, 10, [SparseTerms(torch.tensor([1]), torch.tensor([[3]]), torch.zeros(1, 1))],
                      torch.float32) is None
