"""Per-element math shared by the Triton kernels, mirroring ``ptd_kernels.rowmath``.

Each helper here is the Triton twin of a function in ``rowmath`` and keeps its statements in the
same order, so a change to one is visibly a change to the other. Tests compare both against
dense float64 formulas.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._launch import check_triton

check_triton(triton.__version__)  # before any kernel is defined: the version needed, on first use

# ``BETA_CASE`` values of ``jsd_pointwise``: β = 0 and β = 1 have their own formulas (docs/method.md §2).
BETA_FORWARD_KL = 0  # β = 0: KL(Q ‖ P)
BETA_REVERSE_KL = 1  # β = 1: KL(P ‖ Q)
BETA_MIXTURE = 2  # 0 < β < 1


def beta_case(beta: float) -> int:
    """The ``BETA_CASE`` constexpr for a β in [0, 1] (the same branches as ``rowmath``)."""
    if beta == 0.0:
        return BETA_FORWARD_KL
    if beta == 1.0:
        return BETA_REVERSE_KL
    return BETA_MIXTURE


@triton.jit
def logaddexp(a, b):
    """log(e^a + e^b) for finite a, b (NaN propagates through |a − b|)."""
    hi = tl.maximum(a, b)
    # log(1 + x) with x ≤ 1 loses at most an ulp of 1 in absolute terms: harmless next to hi.
    return hi + tl.log(1.0 + tl.exp(-tl.abs(a - b)))


@triton.jit
def jsd_pointwise(logp, logq, beta, log_beta, log1m_beta, BETA_CASE: tl.constexpr):
    """Per-atom JSD_β contribution ``d`` and weighted score ``w = p·∂D/∂p``.

    Twin of ``rowmath.jsd_pointwise``. ``beta``, ``log_beta`` = log β and ``log1m_beta`` =
    log(1 − β) come from the host in the accumulator dtype (they are only read when
    ``BETA_CASE == BETA_MIXTURE``).
    """
    if BETA_CASE == 0:  # BETA_FORWARD_KL
        q = tl.exp(logq)
        d = q * (logq - logp)
        w = -q
    elif BETA_CASE == 1:  # BETA_REVERSE_KL
        p = tl.exp(logp)
        log_ratio = logp - logq
        d = p * log_ratio
        w = p * (log_ratio + 1.0)
    else:  # BETA_MIXTURE
        p = tl.exp(logp)
        q = tl.exp(logq)
        logm = logaddexp(logq + log_beta, logp + log1m_beta)
        student_part = p * (logp - logm)
        d = beta * q * (logq - logm) + (1.0 - beta) * student_part
        w = (1.0 - beta) * student_part
    return d, w
