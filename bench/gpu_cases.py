"""The calls the GPU work model counts: every public op of ptd_kernels on each CUDA path, and the peers.

Each case makes its inputs (meta tensors that say "cuda", ``gpu_count.cuda_tensor``), marks them as
the memory baseline and runs the forward and, for a differentiable op, the backward of the sum of its
outputs — the library's own code, as a user calls it. A new public op is one more entry of
``PTD_OPS``; a new CUDA backend is found by name (``CUDA_PATHS``) once ``backend=`` accepts it.

The peers run their own code the same way: Liger-Kernel 0.8.5's fused linear JSD, fused linear
cross-entropy (its Triton implementation, the one an H100 gets without CuTe DSL) and fused linear GRPO
loss (``compiled=False``: its torch.compile covers only the per-token loss arithmetic of [T] vectors),
and TRL 1.16's ``ChunkedLogProbFunction`` / ``ChunkedDivergenceFunction`` at the vocabulary chunks
their trainers use.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from gpu_count import Trace, cuda_tensor

# The CUDA paths of ptd, in the order of the tables; one that ``backend=`` does not accept is skipped.
CUDA_PATHS = ("triton", "cublas", "torch")


@dataclass(frozen=True)
class Shape:
    n: int = 8192
    h: int = 4096
    v: int = 151936
    k: int = 100
    dtype: torch.dtype = torch.bfloat16
    sequences: int = 8  # GRPO's [B, T] layout of the N rows (Liger's GRPO loss chunks by sequence)

    @property
    def logits_gemm_flops(self) -> int:
        """FLOPs of one logits GEMM (or one gradient GEMM) of the shape: 2·N·V·H."""
        return 2 * self.n * self.v * self.h

    def label(self) -> str:
        return f"N={self.n} H={self.h} V={self.v} K={self.k} {str(self.dtype).removeprefix('torch.')}"


@dataclass
class Inputs:
    hidden: torch.Tensor
    weight: torch.Tensor
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    targets: torch.Tensor
    teacher_ids: torch.Tensor
    teacher_logprobs: torch.Tensor
    shape: Shape

    @property
    def grad_bytes(self) -> int:
        """Bytes of the input gradients the call left (the caller keeps them: inside the peak, outside
        the working memory)."""
        return sum(t.grad.numel() * t.grad.element_size() for t in (self.hidden, self.weight) if t.grad is not None)


def make_inputs(shape: Shape) -> Inputs:
    n, h, v, k = shape.n, shape.h, shape.v, shape.k
    return Inputs(cuda_tensor((n, h), shape.dtype, requires_grad=True),
                  cuda_tensor((v, h), shape.dtype, requires_grad=True),
                  cuda_tensor((n, h), shape.dtype), cuda_tensor((v, h), shape.dtype),
                  cuda_tensor((n,), torch.int64), cuda_tensor((n, k), torch.int64),
                  cuda_tensor((n, k), torch.float32), shape)


@dataclass(frozen=True)
class Op:
    """A ptd op: its call (returning a scalar to differentiate, or None) and its GEMM floor."""

    name: str
    call: Callable
    floor: int  # logits-GEMM equivalents its form needs at cuBLAS speed
    floor_why: str
    target: float = 1.2  # issue 21.5: at most this × the floor
    peers: tuple = ()  # peer case names compared with it


def _ptd():
    import ptd_kernels

    return ptd_kernels


def _total(*outputs):
    return sum(o.sum() for o in outputs)


def _policy_loss(x: Inputs, backend: str, *, teacher: bool, accumulator_beyond_budget: bool = False):
    """``linear_policy_loss`` with PTD-PO's named token losses (clipped ratio against old log-probs, k3 KL, λ·D_K
    on every row, an entropy bonus), or the policy loss alone. ``accumulator_beyond_budget``: the cuBLAS one
    sweep's float32 d weight accumulator held beyond the working-memory budget, so that it runs at this shape."""
    ptd = _ptd()
    n = x.shape.n
    loss = ptd.PolicyLoss(cuda_tensor((n,), torch.float32), weights=cuda_tensor((n,), torch.float32),
                          old_logprobs=cuda_tensor((n,), torch.float32), ref_logprobs=cuda_tensor((n,), torch.float32),
                          kl_coef=0.01, ptd_coef=0.05 if teacher else 0.0, ptd_tokens=float(n), entropy_coef=0.001)
    pair = (x.teacher_hidden, x.teacher_weight, x.shape.k) if teacher else ()
    from ptd_kernels.backends.cublas import fused_loss

    saved = fused_loss.ACCUMULATOR_IN_BUDGET
    fused_loss.ACCUMULATOR_IN_BUDGET = saved and not accumulator_beyond_budget
    try:  # (the one sweep forms the gradients in the forward)
        return ptd.linear_policy_loss(x.hidden, x.weight, x.targets, *pair, row_loss=loss, backend=backend)
    finally:
        fused_loss.ACCUMULATOR_IN_BUDGET = saved


PTD_OPS = (
    Op("linear_logprobs", lambda x, b: _total(*_ptd().linear_logprobs(
        x.hidden, x.weight, x.targets, with_entropy=True, backend=b)), 4,
        "forward, recompute, ∂hidden, ∂weight (per-row: the backward recomputes the logits)",
        peers=("trl_chunked_logprob", "liger_fused_linear_cross_entropy", "liger_fused_linear_grpo")),
    Op("linear_topk", lambda x, b: _ptd().linear_topk(x.teacher_hidden, x.teacher_weight, x.shape.k, backend=b)
       and None, 1, "one forward GEMM (the teacher's top-K, no gradient)"),
    Op("linear_topk_jsd", lambda x, b: _ptd().linear_topk_jsd(
        x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, x.shape.k, backend=b).sum(), 5,
        "student and teacher forward, recompute, ∂hidden, ∂weight"),
    Op("linear_sparse_jsd", lambda x, b: _ptd().linear_sparse_jsd(
        x.hidden, x.weight, x.teacher_ids, x.teacher_logprobs, backend=b).sum(), 4,
        "student forward, recompute, ∂hidden, ∂weight (the teacher is given as ids and log-probs)"),
    Op("linear_jsd", lambda x, b: _ptd().linear_jsd(
        x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, backend=b).sum(), 6,
        "student and teacher forward, both recomputed, ∂hidden, ∂weight",
        peers=("trl_chunked_divergence", "liger_fused_linear_jsd")),
    Op("linear_ptd_terms", lambda x, b: _total(*_ptd().linear_ptd_terms(
        x.hidden, x.weight, x.targets, x.teacher_hidden, x.teacher_weight, x.shape.k, backend=b)[:3]), 5,
        "student and teacher forward, recompute, ∂hidden, ∂weight"),
    Op("linear_jsd_loss", lambda x, b: _ptd().linear_jsd_loss(
        x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, backend=b), 4,
        "student and teacher forward, ∂hidden, ∂weight (gradients formed in the forward sweep)",
        peers=("liger_fused_linear_jsd", "trl_chunked_divergence")),
    Op("linear_topk_jsd_loss", lambda x, b: _ptd().linear_topk_jsd_loss(
        x.hidden, x.weight, x.teacher_hidden, x.teacher_weight, x.shape.k, backend=b), 4,
        "student and teacher forward, ∂hidden, ∂weight (gradients formed in the forward sweep)"),
    Op("linear_policy_loss", lambda x, b: _policy_loss(x, b, teacher=True), 4,
       "the whole PTD-PO loss: student and teacher forward, ∂hidden, ∂weight (one sweep where it pays: "
       "on cuBLAS with a 16-bit weight, not within 1 GiB — its float32 ∂weight accumulator)",
       target=1.3, peers=("liger_fused_linear_grpo",)),
    Op("linear_policy_loss (no teacher)", lambda x, b: _policy_loss(x, b, teacher=False), 3,
       "the policy loss alone: forward, ∂hidden, ∂weight (one sweep where it pays)", target=1.3,
       peers=("liger_fused_linear_grpo", "liger_fused_linear_cross_entropy")),
    Op("linear_policy_loss (one sweep, accumulator beyond the budget)", lambda x, b: _policy_loss(
        x, b, teacher=True, accumulator_beyond_budget=True), 4,
       "the whole PTD-PO loss in one sweep on cuBLAS, its V×H×4-byte float32 ∂weight accumulator held beyond "
       "the 1 GiB budget", target=1.3),
    Op("linear_logprobs_at", lambda x, b: _total(*_ptd().linear_logprobs_at(
        x.hidden, x.weight, x.teacher_ids, with_entropy=True, backend=b)), 4,
       "forward, recompute, ∂hidden, ∂weight (the ids' part as sparse terms of one backward sweep)"),
)


def available_paths() -> tuple:
    """The CUDA paths ``backend=`` accepts in this checkout: each is tried on a tiny counted call, and one
    refused with a ValueError naming ``backend`` is left out."""
    from gpu_count import counting

    paths = []
    for path in CUDA_PATHS:
        try:
            with counting() as trace:
                run_case(lambda x, path=path: PTD_OPS[0].call(x, path), Shape(n=16, h=16, v=64, k=2), trace)
        except ValueError as error:
            if "backend" in str(error):
                continue
            raise
        paths.append(path)
    return tuple(paths)


# ----------------------------------------------------------------------------- peers


def _apply(function, **named):
    """``function.apply`` with its forward's arguments by name (the rest at their defaults)."""
    parameters = list(inspect.signature(function.forward).parameters.values())[1:]  # after ctx
    values = []
    for parameter in parameters:
        if parameter.name in named:
            values.append(named.pop(parameter.name))
        elif parameter.default is not inspect.Parameter.empty:
            values.append(parameter.default)
        else:
            raise TypeError(f"{function.__name__}.forward needs {parameter.name}")
    if named:
        raise TypeError(f"{function.__name__}.forward has no argument(s) {sorted(named)}")
    return function.apply(*values)


def _liger_jsd(x: Inputs):
    from liger_kernel.ops.fused_linear_jsd import LigerFusedLinearJSDFunction

    return _apply(LigerFusedLinearJSDFunction, student_input=x.hidden, student_weight=x.weight,
                  teacher_input=x.teacher_hidden, teacher_weight=x.teacher_weight, jsd_beta=0.5,
                  jsd_impl="nvidia-triton")


def _liger_cross_entropy(x: Inputs):
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    loss = _apply(LigerFusedLinearCrossEntropyFunction, _input=x.hidden, weight=x.weight, target=x.targets,
                  ce_impl="nvidia-triton")
    return loss[0] if isinstance(loss, tuple) else loss


def _liger_grpo(x: Inputs):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    b = x.shape.sequences
    t = x.shape.n // b
    per_token = cuda_tensor((b, t), torch.float32)
    loss, _metrics = LigerFusedLinearGRPOLoss(compiled=False, use_ref_model=True)(
        x.hidden.view(b, t, -1), x.weight, x.targets.view(b, t), cuda_tensor((b, t), torch.bool),
        cuda_tensor((b,), torch.float32), ref_per_token_logps=per_token, old_per_token_logps=per_token)
    return loss


def _trl_logprob_chunk() -> int:
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError:  # a private name: the value TRL 1.16 uses
        chunk = 32768
    return chunk


def _trl_logprob(x: Inputs):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    logp, entropy, *_ = ChunkedLogProbFunction.apply(x.hidden, x.weight, None, x.targets, 1.0, _trl_logprob_chunk(),
                                                      None, 1.0, ("entropy",))
    return logp.sum() + entropy.sum()


def _trl_divergence(x: Inputs):
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    jsd, _entropy = ChunkedDivergenceFunction.apply(x.hidden, x.weight, None, x.teacher_hidden, x.teacher_weight,
                                                    None, 0.5, 1.0, 1.0, None, 1.0, None)
    return jsd.sum()


@dataclass(frozen=True)
class Peer:
    name: str
    library: str
    module: str  # importing it tells whether the peer is installed (TRL is the trl extra, Liger in dev)
    call: Callable
    floor: int
    what: str


PEERS = (
    Peer("trl_chunked_logprob", "TRL 1.16", "trl.kernels.chunked_logprob", _trl_logprob, 4,
         "ChunkedLogProbFunction: log-prob + entropy, 4096-row × 32768-column cuBLAS tiles, Triton folds"),
    Peer("trl_chunked_divergence", "TRL 1.16", "trl.kernels.chunked_divergence", _trl_divergence, 6,
         "ChunkedDivergenceFunction: JSD β=0.5 (statistics sweep, JSD sweep, recomputing backward)"),
    Peer("liger_fused_linear_jsd", "Liger-Kernel 0.8.5", "liger_kernel.ops.fused_linear_jsd", _liger_jsd, 4,
         "LigerFusedLinearJSDFunction: JSD β=0.5 loss, gradients in the forward, Triton JSD kernel"),
    Peer("liger_fused_linear_cross_entropy", "Liger-Kernel 0.8.5", "liger_kernel.ops.fused_linear_cross_entropy",
         _liger_cross_entropy, 3,
         "LigerFusedLinearCrossEntropyFunction: mean cross-entropy (log-prob only, no entropy), "
         "gradients in the forward"),
    Peer("liger_fused_linear_grpo", "Liger-Kernel 0.8.5", "liger_kernel.chunked_loss", _liger_grpo, 4,
         "LigerFusedLinearGRPOLoss: GRPO (DAPO) loss with given reference and old log-probs, "
         "log-prob only, per-sequence chunks, compiled=False"),
)


def available_peers() -> tuple:
    """The peers whose library imports here (the others are left out of the tables)."""
    found = []
    for peer in PEERS:
        try:
            importlib.import_module(peer.module)
        except Exception:  # noqa: BLE001 - not installed, or its own dependencies are not
            continue
        found.append(peer)
    return tuple(found)


def run_case(call, shape: Shape, trace: Trace) -> Inputs:
    """Inside ``gpu_count.counting``: make the inputs, then count the call's forward and backward."""
    inputs = make_inputs(shape)
    trace.mark_baseline()
    trace.phase = "forward"
    loss = call(inputs)
    if loss is not None:
        trace.phase = "backward"
        loss.backward()
    return inputs
