"""ptd_kernels: distillation losses fused with the output layer (placeholder: reference only)."""

from . import reference
from ._types import PTDTerms, TopK
from .reference import (  # noqa: F401  (replaced by the fused functional API)
    jsd,
    linear_jsd,
    linear_jsd_loss,
    linear_logprobs,
    linear_ptd_terms,
    linear_sparse_jsd,
    linear_topk,
    linear_topk_jsd,
    linear_topk_jsd_loss,
    logprobs,
    topk_jsd,
    topk_overlap,
)

__all__ = ["reference", "PTDTerms", "TopK"]
