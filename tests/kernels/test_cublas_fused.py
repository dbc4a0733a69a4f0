"""Every public fused function on ``backend="cublas"``: the cases of test_fused.py, test_fused_edges.py and
test_logit_transform.py (the same problems, checks and tolerances; see test_fused.py), run on the cuBLAS
backend — on CUDA tensors on a GPU host; here its elementwise kernels under TRITON_INTERPRET=1 and its GEMMs as
torch CPU matmuls (the ``device`` fixture decides).

The test bodies are those files' own functions, called with "cublas" (a representative subset of their
grids, like the Triton backend's: every function, every dtype, each support/tail/β branch at least once,
the edge cases). Blocks are shrunk (``small_blocks``) so that the tiny problems still take several
vocabulary blocks, row blocks of whole rows, partial kernel tiles and partial blocks.
"""

from __future__ import annotations

import pytest
import test_fused as fused
import test_fused_edges as edges
import test_logit_transform as transforms
from _fused_cases import ALL_FNS, BETAS, BF16, F32, F64, SUPPORTS, K, V, extreme_case

from ptd_kernels import config
from ptd_kernels.backends.cublas import _blocks

# slow: every public function through the interpreted cuBLAS kernels (the conformance suite is the quick check)
pytestmark = [pytest.mark.usefixtures("one_thread", "small_blocks"), pytest.mark.backend("cublas"), pytest.mark.slow]
BE = "cublas"


@pytest.fixture
def small_blocks(monkeypatch):
    """Vocabulary blocks of 6 rows × 48 columns (V = 130: 3 blocks, the last partial; 24 columns with both
    sides); whole-row blocks of 2 rows (one side) or 1 (both sides), and the loss functions on the one-sweep
    path even so (``test_loss_on_the_per_row_path`` takes the other)."""
    from ptd_kernels.backends.cublas import fused_loss

    monkeypatch.setattr(config, "CUDA_BLOCK_BYTES", 6 * 48 * 4)
    monkeypatch.setattr(_blocks, "MIN_BLOCK_COLS", 48)
    monkeypatch.setattr(fused_loss, "FUSED_MIN_ROWS", 1)


def ids(params):
    return ["-".join(str(getattr(p, "__name__", p)).replace("torch.", "") for p in ps) for ps in params]


LOGPROBS = [(F32, True, True), (BF16, True, True), (F32, False, False), (F64, True, True)]


@pytest.mark.parametrize("dtype,bias,entropy", LOGPROBS, ids=ids(LOGPROBS))
def test_linear_logprobs(dtype, bias, entropy, device):
    fused.test_linear_logprobs(BE, device, dtype, bias, entropy)


def test_linear_logprobs_custom_ignore_index(device):
    fused.test_linear_logprobs_custom_ignore_index(BE, device, F32)


TOPK = [(F32, 7), (BF16, 1), (F32, V), (F64, 7)]


@pytest.mark.parametrize("dtype,k", TOPK, ids=ids(TOPK))
def test_linear_topk(dtype, k, device):
    fused.test_linear_topk(BE, device, dtype, k)


TOPK_JSD = [(F32, s, t, b) for s, t, b in zip(SUPPORTS * 2, (True, False) * 3, BETAS * 2)] + [
    (BF16, "union", True, 0.5), (BF16, "teacher", False, 1.0)]


@pytest.mark.parametrize("dtype,support,tail,beta", TOPK_JSD, ids=ids(TOPK_JSD))
def test_linear_topk_jsd(dtype, support, tail, beta, device):
    fused.test_linear_topk_jsd(BE, device, dtype, support, tail, beta)


@pytest.mark.parametrize("support,tail,beta", [("union", True, 0.5), ("student", False, 1.0)])
def test_linear_topk_jsd_float64(support, tail, beta, device):
    fused.test_linear_topk_jsd_float64(BE, device, F64, support, tail, beta)


@pytest.mark.parametrize("support,tail,bias", [("union", True, False), ("student", False, True),
                                               ("teacher", True, True)])
def test_linear_topk_jsd_k1(support, tail, bias, device):
    fused.test_linear_topk_jsd_k1(BE, device, support, tail, bias)


@pytest.mark.parametrize("support,tail,k,beta", [("union", True, V, 0.5), ("teacher", False, V + 7, 0.0)])
def test_k_at_least_vocab_equals_linear_jsd(support, tail, k, beta, device):
    fused.test_k_at_least_vocab_equals_linear_jsd(BE, device, support, tail, k, beta)


SPARSE = [(F32, 0.5, True, "topk"), (BF16, 1.0, False, "random"), (F64, 0.0, True, "random")]


@pytest.mark.parametrize("dtype,beta,tail,ids_kind", SPARSE, ids=ids(SPARSE))
def test_linear_sparse_jsd(dtype, beta, tail, ids_kind, device):
    fused.test_linear_sparse_jsd(BE, device, dtype, beta, tail, ids_kind)


JSD = [(F32, 0.0, True), (F32, 0.5, False), (F32, 1.0, True), (BF16, 0.5, True), (F64, 0.5, True)]


@pytest.mark.parametrize("dtype,beta,bias", JSD, ids=ids(JSD))
def test_linear_jsd(dtype, beta, bias, device):
    fused.test_linear_jsd(BE, device, dtype, beta, bias)


PTD = [(F32, "union", True, 0.5, K), (BF16, "teacher", False, 0.0, K), (F32, "union", True, 0.5, V),
       (F32, "student", False, 1.0, K), (F32, "union", True, 0.5, 1), (F64, "union", True, 0.5, K)]


@pytest.mark.parametrize("dtype,support,tail,beta,k", PTD, ids=ids(PTD))
def test_linear_ptd_terms(dtype, support, tail, beta, k, device):
    fused.test_linear_ptd_terms(BE, device, dtype, support, tail, beta, k)


def test_ptd_terms_equal_the_separate_functions(device):
    fused.test_ptd_terms_equal_the_separate_functions(BE, device, "union", True)


LOSS = [(F32, "jsd", True, "union", True, 0.5), (F32, "topk", False, "union", True, 0.5),
        (BF16, "topk", True, "teacher", False, 1.0), (F32, "topk", True, "student", True, 0.0),
        (F64, "topk", True, "union", True, 0.5)]


@pytest.mark.parametrize("dtype,kind,weighted,support,tail,beta", LOSS, ids=ids(LOSS))
def test_loss_level(dtype, kind, weighted, support, tail, beta, device):
    fused.test_loss_level(BE, device, dtype, kind, weighted, support, tail, beta)


def test_loss_scales_with_the_incoming_gradient(device):
    fused.test_loss_scales_with_the_incoming_gradient(BE, device)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", list(ALL_FNS))
def test_all_rows_masked(name, device):
    edges.test_all_rows_masked(BE, device, name)


@pytest.mark.parametrize("name", list(ALL_FNS))
def test_single_row(name, device):
    edges.test_single_row(BE, device, name)


EXTREME = [("topk_jsd", F32, True), ("ptd_terms", F32, False), ("logprobs", BF16, True), ("sparse_jsd", F32, True),
           ("topk_jsd_loss", F32, False), ("jsd_loss", F64, True)]


@pytest.mark.parametrize("name,dtype,bias", EXTREME)
def test_huge_logit_and_tied_rows(name, dtype, bias, device):
    edges.test_huge_logit_and_tied_rows(BE, device, name, dtype, bias)


@pytest.mark.parametrize("name", ["logprobs", "ptd_terms", "topk_jsd_loss", "jsd_loss"])
def test_huge_hidden_row_weight_gradient(name, device):
    edges.test_huge_hidden_row_weight_gradient(BE, device, name)


# The per-row full JSD is the one op whose forward and backward GEMMs differ in shape: its forward needs
# whole rows of both sides (both logsumexps come before any term), its backward goes over vocabulary blocks
# of all rows. A GEMM of another shape may sum in another order, so each logit differs between the sweeps
# by up to ~|z|·2⁻²⁴, and the backward's p = e^{z − lse} (and q) by a factor e^{±|z|·2⁻²⁴}. On a one-hot row
# the gradient's terms then cancel to that rounding instead of to 0. The edge cases' rows × 1e4 give logits
# of 7e4: p off by ~0.4 %, and d weight off by 2.6× its scale through that row's ×1e4 hidden state. × 1e3
# (logits of 7e3): a one-hot teacher row's q off by ~4e-4, that row's d hidden by 1.4e-4 of its scale.
# × 1e2 (logits of 7e2) is at the float32 reference's own error, and still beyond any language model's
# logits (|z| ≲ 1e2). Making the two sweeps round alike would cost the backward blocks of whole rows (d weight
# summed over 11 row blocks in float32: a 2.3 GiB buffer and ~20 ms of read-modify-write, +25 % at the target
# shape) or a forward over the backward's vocabulary blocks (2 more GEMMs, +33 %): not worth logits no model
# has. So the math is checked at × 1e4 with the forward and the backward on the same GEMM shapes (one block
# each way: the gradient cancels exactly), and the sweeps' own shapes at × 1e2.
@pytest.fixture(params=["same GEMM shapes, rows x 1e4", "own GEMM shapes, rows x 1e2"])
def jsd_extremes(request, monkeypatch):
    if request.param.startswith("same"):
        monkeypatch.setattr(config, "CUDA_BLOCK_BYTES", 4 * V * 8)  # the 4 rows × V of both sides: one block
        return

    def extreme_at_1e2(dtype=F32, bias=True):
        case = extreme_case(dtype, bias)
        case.hidden[1] /= 100
        case.teacher_hidden[3] /= 100
        return case

    monkeypatch.setattr(edges, "extreme_case", extreme_at_1e2)


def test_per_row_jsd_at_huge_logits(jsd_extremes, device):
    edges.test_huge_logit_and_tied_rows(BE, device, "jsd", F32, True)
    edges.test_huge_hidden_row_weight_gradient(BE, device, "jsd")


def test_huge_teacher_logit_row_alone(device):
    edges.test_huge_teacher_logit_row_alone(BE, device)


@pytest.mark.parametrize("support", SUPPORTS)
def test_tie_rule_in_the_support(support, device):
    edges.test_tie_rule_in_the_support(BE, device, support)


def test_shared_output_layer(device):
    edges.test_shared_output_layer(BE, device)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_row_is_nan_in_that_row_only(bad, device):
    edges.test_nonfinite_row_is_nan_in_that_row_only(BE, device, bad)


def test_nan_in_a_masked_row_does_not_leak(device):
    edges.test_nan_in_a_masked_row_does_not_leak(BE, device)


def test_values_never_negative_at_llm_scale_logits(device):
    edges.test_values_never_negative_at_llm_scale_logits(BE, device)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_beta_endpoints_are_the_kls(beta, device):
    edges.test_beta_endpoints_are_the_kls(BE, device, beta)


# ----------------------------------------------------------------------------- logit scale and soft-cap


TRANSFORMED = [(n, "both", F32) for n in transforms.NAMES] + [("ptd_terms", "cap", BF16), ("jsd", "scale", F64),
                                                               ("logprobs", "cap", F64)]


@pytest.mark.parametrize("name,transform,dtype", TRANSFORMED, ids=ids(TRANSFORMED))
def test_transformed_logits_match_the_reference(name, transform, dtype, device):
    transforms.test_transformed_logits_match_the_reference(BE, device, name, transform, dtype)


def test_linear_topk_with_a_cap(device):
    transforms.test_linear_topk_with_a_cap(BE, device)


def test_saturated_float64_caps_keep_the_exact_top_k(device):
    transforms.test_saturated_float64_caps_keep_the_exact_top_k(BE, device)


def test_loss_on_the_per_row_path(monkeypatch, device):
    """A loss function with the one-sweep path switched off (``fused_loss_pays`` False): the per-row
    function composed by autograd on this backend, against the reference."""
    from ptd_kernels.backends.cublas import fused_loss

    monkeypatch.setattr(fused_loss, "FUSED_MIN_ROWS", 10**9)
    fused.test_loss_level(BE, device, F32, "topk", True, "union", True, 0.3)
