"""The two backends behind one small interface used by the autograd Functions.

An engine offers, on live rows only (the functional layer strips masked rows):

- ``row_stats(hidden, weight, bias, τ, targets, k, with_mean_logit)`` → lse, Σp·z, target
  logit, top-k ids and logits, from one sweep over the vocabulary;
- ``head_backward(...)`` → gradients of dz = p·(row_coef + logit_coef·z) + target one-hots +
  sparse support terms, from one recomputing sweep;
- ``jsd_forward`` / ``jsd_backward`` for the full-vocabulary JSD;
- ``fused_loss`` (or None): loss-level value and gradients in one sweep.

Gradients come back in the compute dtype (float32, float64 for float64 inputs); the caller
casts them to the input dtypes.
"""

from __future__ import annotations

import torch

from . import _torch_path
from ._sparse import pad_sparse
from .triton._launch import interpreting


class TorchEngine:
    """Chunked PyTorch: bounded logits blocks, recomputed in backward."""

    name = "torch"

    @staticmethod
    def row_stats(hidden, weight, bias, temperature, targets=None, k=0, with_mean_logit=True):
        return _torch_path.row_stats(hidden, weight, bias, temperature, targets, k, with_mean_logit=with_mean_logit)

    @staticmethod
    def head_backward(hidden, weight, bias, temperature, lse, row_coef, logit_coef=None, logit_shift=None,
                      targets=None, target_coef=None, sparse=(), need_hidden=True, need_weight=True, need_bias=True):
        sparse = list(sparse)
        if targets is not None and target_coef is not None:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            sparse.append((rows, targets[:, None], target_coef[:, None]))
        return _torch_path.head_backward(hidden, weight, bias, temperature, lse, row_coef, logit_coef, logit_shift,
                                         sparse, need_hidden=need_hidden, need_weight=need_weight,
                                         need_bias=need_bias)

    @staticmethod
    def jsd_forward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, temperature, beta):
        return _torch_path.jsd_forward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                                       temperature, beta)

    @staticmethod
    def jsd_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, temperature, beta, lse,
                     teacher_lse, w_sum, grad, need_hidden=True, need_weight=True, need_bias=True):
        return _torch_path.jsd_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                                        temperature, beta, lse, teacher_lse, w_sum, grad, need_hidden=need_hidden,
                                        need_weight=need_weight, need_bias=need_bias)

    fused_loss = staticmethod(_torch_path.fused_loss)
    fused_loss_pays = staticmethod(_torch_path.fused_loss_pays)


def _as_compute(t, dtype):
    return None if t is None else t.to(dtype)


class TritonEngine:
    """Triton kernels for the vocabulary sweeps; gathers at a few ids per row stay in PyTorch."""

    name = "triton"
    fused_loss = None

    @staticmethod
    def fused_loss_pays(vocab: int) -> bool:
        return False

    @staticmethod
    def row_stats(hidden, weight, bias, temperature, targets=None, k=0, with_mean_logit=True):
        from .triton import row_stats as kernel

        if k > kernel.MAX_K:  # beyond the register top-k: the chunked path does the same sweep
            return _torch_path.row_stats(hidden, weight, bias, temperature, targets, k,
                                         with_mean_logit=with_mean_logit)
        return kernel.row_stats(hidden, weight, bias, temperature, targets, k, with_mean_logit=with_mean_logit)

    @staticmethod
    def head_backward(hidden, weight, bias, temperature, lse, row_coef, logit_coef=None, logit_shift=None,
                      targets=None, target_coef=None, sparse=(), need_hidden=True, need_weight=True, need_bias=True):
        from .triton.head_backward import head_backward

        dtype = _torch_path.compute_dtype(weight.dtype)
        # The support terms go into the kernel's dz tiles (as the torch path adds them into its
        # blocks): dense and sparse parts of a logit cancel before they multiply hidden.
        padded = pad_sparse(hidden.shape[0], weight.shape[0], sparse, dtype)
        sparse_ids, sparse_coef = padded if padded is not None else (None, None)
        grad_hidden, grad_weight, grad_bias = head_backward(
            hidden, weight, bias, temperature, lse.to(dtype), row_coef.to(dtype), _as_compute(logit_coef, dtype),
            targets, _as_compute(target_coef, dtype), _as_compute(logit_shift, dtype), sparse_ids, sparse_coef,
            need_hidden_grad=need_hidden, need_weight_grad=need_weight, need_bias_grad=need_bias)
        return (_as_compute(grad_hidden, dtype) if need_hidden else None,
                _as_compute(grad_weight, dtype) if need_weight else None,
                _as_compute(grad_bias, dtype) if need_bias else None)

    @staticmethod
    def jsd_forward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, temperature, beta):
        from .triton.jsd import jsd_forward
        from .triton.row_stats import row_stats

        # float64 normalizers: log p = z − lse exact before rounding (no Σp ≠ 1 drift at large logits)
        lse = row_stats(hidden, weight, bias, temperature, with_mean_logit=False, lse_dtype=torch.float64).lse
        teacher_lse = row_stats(teacher_hidden, teacher_weight, teacher_bias, temperature, with_mean_logit=False,
                                lse_dtype=torch.float64).lse
        value, w_sum = jsd_forward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, temperature,
                                   lse, teacher_lse, beta)
        return value, w_sum, lse, teacher_lse

    @staticmethod
    def jsd_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, temperature, beta, lse,
                     teacher_lse, w_sum, grad, need_hidden=True, need_weight=True, need_bias=True):
        from .triton.jsd import jsd_backward

        dtype = _torch_path.compute_dtype(weight.dtype)
        grad_hidden, grad_weight, grad_bias = jsd_backward(
            hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, temperature, lse, teacher_lse, beta,
            w_sum, grad.to(dtype), need_hidden_grad=need_hidden, need_weight_grad=need_weight, need_bias_grad=need_bias)
        return (_as_compute(grad_hidden, dtype) if need_hidden else None,
                _as_compute(grad_weight, dtype) if need_weight else None,
                _as_compute(grad_bias, dtype) if need_bias else None)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a dependency, but may fail to load on odd platforms
        return False
    return True


def select(backend: str, *tensors):
    """``auto``: Triton for CUDA tensors or under TRITON_INTERPRET=1, else the chunked PyTorch path."""
    if backend == "torch":
        return TorchEngine
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was requested but triton cannot be imported")
        if not interpreting() and not all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor)):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU)")
        return TritonEngine
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)
    if (on_cuda or interpreting()) and triton_available():
        return TritonEngine
    return TorchEngine
