"""TRL 1.16's fused output-layer kernels as benchmark peers, and the check that they compute what ptd does.

TRL ships two ``torch.autograd.Function`` s that never hold the [N, V] logits:

- ``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` (GRPO's fused LM head): log-prob of the
  sampled token and optionally the entropy, in tiles of ``TOKEN_CHUNK_SIZE`` (4096) rows × the
  caller's vocabulary chunk (its trainer passes 32768); the backward recomputes each tile.
- ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` (the distillation trainer): the
  generalized JSD with the mixture (1 − β)·p_student + β·p_teacher, i.e. the β convention of docs/method.md §2,
  in 4096 × 32768 fp32 tiles: two sweeps over both sides in the forward (statistics, then the JSD),
  one more in the backward. It also returns the student's entropy (no gradient).

On CUDA both fold their tiles with Triton kernels; elsewhere with torch ops on whole tiles. They are
called here as TRL's trainers call them (vocabulary chunk 32768). On CPU those 4096 × 32768 fp32 tiles
and the torch temporaries made from them (a dozen or so per tile) are what their time and memory go
to, so each also runs with a 2048-wide vocabulary chunk (``chunk_size`` for the log-prob; for the
divergence, whose chunk is the module constant ``VOCAB_CHUNK_SIZE``, set for the duration of the
call by ``divergence_vocab_chunk``): the best of the widths tried here (2048 to 32768), a tuned TRL.
Rows that use them skip when TRL is not installed (the ``trl`` extra), or when its import fails
(TRL's distillation module imports its trainer stack: accelerate, datasets, pandas).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

# The vocabulary chunk of the tuned rows (CPU, this repository's 2-core machine: 2048 beat 4096, 8192
# and 32768 on both time and memory for both kernels).
TUNED_CHUNK = 2048

# The vocabulary chunk TRL's GRPO trainer passes to ChunkedLogProbFunction (trl.trainer.utils).
DEFAULT_LOGPROB_CHUNK = 32768


def load():
    """(ChunkedLogProbFunction, ChunkedDivergenceFunction, logprob vocabulary chunk), or skip the row."""
    try:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    except Exception as exc:  # noqa: BLE001 - not installed, or its trainer stack is not: the rows skip
        pytest.skip(f"TRL's fused kernels not importable (the trl extra: pip install -e \".[trl]\"): "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError:  # a private name: fall back to the value TRL 1.16 uses
        chunk = DEFAULT_LOGPROB_CHUNK
    return ChunkedLogProbFunction, ChunkedDivergenceFunction, chunk


def trl_logprobs(hidden, weight, targets, *, with_entropy, logit_scale=1.0, softcap=None, vocab_chunk=None):
    """log p of ``targets`` [N] (and the entropy [N]) by TRL's ChunkedLogProbFunction, τ = 1, no bias;
    ``vocab_chunk`` None: the chunk TRL's GRPO trainer passes."""
    logprob_fn, _, chunk = load()
    logp, entropy, *_ = logprob_fn.apply(hidden, weight, None, targets, 1.0, vocab_chunk or chunk, softcap,
                                         logit_scale, ("entropy",) if with_entropy else ())
    return (logp, entropy) if with_entropy else logp


def divergence_chunk() -> int:
    """The vocabulary chunk ChunkedDivergenceFunction uses (its module constant)."""
    import trl.kernels.chunked_divergence as module

    return module.VOCAB_CHUNK_SIZE


@contextlib.contextmanager
def divergence_vocab_chunk(width: int | None):
    """ChunkedDivergenceFunction's vocabulary chunk set to ``width`` inside the block (its forward and
    backward read the module constant when they run: wrap both); None leaves TRL's value."""
    if width is None:
        yield
        return
    import trl.kernels.chunked_divergence as module

    saved = module.VOCAB_CHUNK_SIZE
    module.VOCAB_CHUNK_SIZE = width
    try:
        yield
    finally:
        module.VOCAB_CHUNK_SIZE = saved


def trl_jsd(hidden, weight, teacher_hidden, teacher_weight, *, beta, logit_scale=1.0, softcap=None,
            teacher_logit_scale=1.0, teacher_softcap=None):
    """Per-row JSD_β [N] by TRL's ChunkedDivergenceFunction, τ = 1, no biases (its entropy output dropped)."""
    _, divergence_fn, _ = load()
    jsd, _entropy = divergence_fn.apply(hidden, weight, None, teacher_hidden, teacher_weight, None, beta, 1.0,
                                        logit_scale, softcap, teacher_logit_scale, teacher_softcap)
    return jsd


# One check per session and device: TRL's outputs and input gradients against ptd's on a small
# problem, plain and with a logit scale and soft-cap on both sides.
_CHECKED: dict = {}
CHECK_SHAPE = (48, 32, 3000)  # N, H, V


def check_against_ptd(device: str, backend: str, beta: float = 0.5) -> str:
    """Compare TRL's log-prob, entropy and JSD (values, d hidden, d weight) with ptd's, float32, on ``device``
    (ptd on ``backend``, the one the rows time). Raises AssertionError on a mismatch; returns a summary."""
    if device in _CHECKED:
        return _CHECKED[device]
    import ptd_kernels as ptd

    n, h, v = CHECK_SHAPE
    gen = torch.Generator().manual_seed(1)
    hidden0 = torch.randn(n, h, generator=gen).to(device)
    weight0 = (torch.randn(v, h, generator=gen) * 2 * h**-0.5).to(device)
    teacher_hidden = hidden0 + 0.5 * torch.randn(n, h, generator=gen).to(device)
    teacher_weight = weight0 + (torch.randn(v, h, generator=gen) * h**-0.5).to(device)
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    worst = 0.0

    def grads(fn):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        outs = fn(hidden, weight)
        # a fixed, row-dependent cotangent, so that a per-row error cannot cancel in a sum
        cot = torch.linspace(0.5, 1.5, n, device=device)
        sum((o * cot).sum() for o in outs).backward()
        return [o.detach() for o in outs] + [hidden.grad, weight.grad]

    def same(a, b, what):
        nonlocal worst
        for x, y, name in zip(a, b, ("out0", "out1", "out2")[: len(a) - 2] + ("d hidden", "d weight")):
            torch.testing.assert_close(x, y, rtol=2e-4, atol=2e-5, msg=lambda m, w=what, k=name: f"TRL vs ptd, {w}, "
                                       f"{k}: {m}")
            worst = max(worst, (x - y).abs().max().item())

    for kw in ({}, {"logit_scale": 0.5, "softcap": 3.0}):
        tkw = {"teacher_logit_scale": kw.get("logit_scale", 1.0), "teacher_softcap": kw.get("softcap")}
        label = "plain" if not kw else "logit_scale 0.5, softcap 3"
        same(grads(lambda x, w, kw=kw: trl_logprobs(x, w, targets, with_entropy=True, **kw)),
             grads(lambda x, w, kw=kw: ptd.linear_logprobs(x, w, targets, with_entropy=True, backend=backend, **kw)),
             f"log-prob + entropy ({label})")
        same(grads(lambda x, w, kw=kw, tkw=tkw: (trl_jsd(x, w, teacher_hidden, teacher_weight, beta=beta, **kw,
                                                          **tkw),)),
             grads(lambda x, w, kw=kw, tkw=tkw: (ptd.linear_jsd(x, w, teacher_hidden, teacher_weight, beta=beta,
                                                                backend=backend, **kw, **tkw),)),
             f"JSD β={beta} ({label})")
    _CHECKED[device] = (f"checked at N,H,V={n},{h},{v} fp32 (plain; logit scale + soft-cap): values and input "
                        f"gradients equal ptd's {backend} path, max |Δ| {worst:.1e}")
    return _CHECKED[device]
