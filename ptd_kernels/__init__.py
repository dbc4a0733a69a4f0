"""ptd_kernels: distillation losses fused with the output layer.

Log-probs, entropy, full JSD and PTD-PO's Top-K JSD with tail compensation, computed from hidden
states and output-layer weights tile by tile over the vocabulary: no tokens×vocabulary tensor
is ever allocated. Every function takes ``backend=`` "auto" or a registered backend's name
(``backend_names()``: "triton", "torch", ...); ``ptd_kernels.reference`` holds the same functions written
the obvious way (the test oracle).
"""

from . import config, reference
from ._types import PTDTerms, TopK
from ._validate import SUPPORTS
from .backends.registry import backend_names, backends_for, register_backend, registered_backends
from .functional import (
    linear_jsd,
    linear_jsd_loss,
    linear_logprobs,
    linear_logprobs_at,
    linear_policy_loss,
    linear_ptd_terms,
    linear_sparse_jsd,
    linear_topk,
    linear_topk_jsd,
    linear_topk_jsd_loss,
)
from .logits_level import jsd, logprobs, topk_jsd, topk_overlap
from .modules import LinearJSDLoss, LinearLogprobs, LinearPTDTerms, LinearTopKJSDLoss
from .policy_loss import PolicyLoss, normalization_weights

__all__ = [
    "LinearJSDLoss",
    "LinearLogprobs",
    "LinearPTDTerms",
    "LinearTopKJSDLoss",
    "PTDTerms",
    "PolicyLoss",
    "SUPPORTS",
    "TopK",
    "backend_names",
    "backends_for",
    "jsd",
    "linear_jsd",
    "linear_jsd_loss",
    "linear_logprobs",
    "linear_logprobs_at",
    "linear_policy_loss",
    "linear_ptd_terms",
    "linear_sparse_jsd",
    "linear_topk",
    "linear_topk_jsd",
    "linear_topk_jsd_loss",
    "config",
    "logprobs",
    "normalization_weights",
    "reference",
    "register_backend",
    "registered_backends",
    "topk_jsd",
    "topk_overlap",
]
