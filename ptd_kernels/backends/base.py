"""The backend interface: the few vocabulary sweeps every public function is built from.

Each backend (``backends/torch``, ``backends/triton``) implements exactly :class:`Backend`; the
autograd layer (``ptd_kernels.autograd``) composes these primitives and never looks inside
them. Another backend — a vocabulary-parallel one, say — is one more subclass.

Notation (docs/method.md §2): a :class:`Head` is one side's output layer on the rows of a call,
z = (hidden @ weightᵀ + bias) / τ, p = softmax(z), lse = logsumexp(z). The primitives:

- ``row_stats``: lse, Σ_v p·z, the target logit and the top-k (ids, logits) in one sweep;
- ``gather_logits``: z at a few ids per row (support sets), without a sweep;
- ``head_backward``: gradients of a loss whose ∂L/∂z is described by :class:`HeadGradCoefs`
  (every per-row loss of the library reduces to it), from one recomputing sweep;
- ``jsd_forward`` / ``jsd_backward``: the full-vocabulary JSD, which needs both sides per tile;
- ``fused_loss`` (optional, ``fused_loss_pays``): a sum of per-row losses of the per-row terms
  (log-prob, entropy, divergence; :class:`RowLoss`) and its gradients from one sweep over blocks of
  whole rows: a block's terms, then their loss's derivatives, then ∂L/∂z and the gradient GEMMs, with
  no recomputing sweep.

Inputs are live rows only (the autograd layer strips masked rows). Statistics come back in the
compute dtype (``ptd_kernels._dtypes.compute_dtype``: float64 for float64 inputs, else float32).
Each gradient comes back in the compute dtype or in its input's own dtype: a backend may write a
gradient straight in the input's dtype where each element is rounded once from a wider accumulator
(the cuBLAS backend's d weight: one GEMM per vocabulary slice, float32 accumulation inside cuBLAS),
which spares a compute-dtype buffer of the weight's size and its cast. The autograd layer casts
every gradient to its input's dtype, once (a no-op for the second kind).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field, replace

import torch

from .._dtypes import compute_dtype


@dataclass(frozen=True)
class LogitSpec:
    """How one side's logits come from its output layer (docs/method.md §2):

        z = cap_c(s · (hidden @ weightᵀ + bias)) / τ,   cap_c(x) = c · tanh(x / c)  (identity when c is None)

    with s the logit scale (Cohere ``logit_scale``, Granite 1/``logits_scaling``) and c the soft-cap
    (Gemma-2/3 ``final_logit_softcapping``).
    """

    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None


@dataclass(frozen=True)
class Head:
    """One side's output layer on the rows of a call and how its logits are formed from it:
    z = cap_c(s · (hidden @ weightᵀ + bias)) / τ (``spec``; a number alone is taken as τ)."""

    hidden: torch.Tensor  # [n, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V] or None
    spec: LogitSpec = LogitSpec()

    def __post_init__(self):
        if not isinstance(self.spec, LogitSpec):
            object.__setattr__(self, "spec", LogitSpec(float(self.spec)))

    @property
    def temperature(self) -> float:
        return self.spec.temperature

    @property
    def logit_scale(self) -> float:
        return self.spec.logit_scale

    @property
    def softcap(self) -> float | None:
        return self.spec.softcap

    def transform_scalars(self) -> tuple[float, float, float]:
        """(s/τ, s/c, c/τ): z = a·s/τ without a cap, z = tanh(a·s/c)·c/τ with one (a = hidden·weight + bias).
        The chain rule multiplies ∂L/∂z by (1 − tanh²) with a cap, and the gradients by s/τ."""
        s, tau, c = self.logit_scale, self.temperature, self.softcap
        if c is None:
            return s / tau, 0.0, 0.0
        return s / tau, s / c, c / tau

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def vocab(self) -> int:
        """The vocabulary rows this head holds (a vocabulary-parallel rank's slice)."""
        return self.weight.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of this side's statistics."""
        return compute_dtype(self.hidden, self.weight)

    def take_rows(self, index: torch.Tensor | None) -> Head:
        """The same output layer on ``hidden[index]`` (None: every row)."""
        return self if index is None else replace(self, hidden=self.hidden.index_select(0, index))

    def shares_layer_with(self, other: Head) -> bool:
        """Whether ``other`` uses this output layer (same weight and bias data; ``detach()`` and
        autograd make new tensor objects over one storage), so one weight read can serve both."""
        return same_data(self.weight, other.weight) and same_data(self.bias, other.bias)


def same_data(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether two tensors (or two Nones) are views of the same data, laid out alike."""
    if a is None or b is None:
        return a is b
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


@dataclass(frozen=True)
class RowStats:
    """Per-row statistics of a head's logits, from one sweep.

    lse, mean_logit (Σ_v p_v z_v; entropy = lse − mean_logit), target_logit: [n] in the compute
    dtype (None when not asked for). topk_indices: int64 [n, k] by descending logit, ties to the
    smaller id; topk_logits: [n, k], the logits there (None when k = 0).
    """

    lse: torch.Tensor
    mean_logit: torch.Tensor | None = None
    target_logit: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None
    topk_logits: torch.Tensor | None = None

    def take_rows(self, index: torch.Tensor) -> RowStats:
        return RowStats(*(None if t is None else t.index_select(0, index) for t in (
            self.lse, self.mean_logit, self.target_logit, self.topk_indices, self.topk_logits)))


@dataclass(frozen=True)
class SparseTerms:
    """A few extra ∂L/∂z terms per row: coef[m, j] at (row_index[m], ids[m, j]).

    Several triples may name one row, and one row may repeat an id: the terms add up. An id
    outside [0, V) matches no column.
    """

    row_index: torch.Tensor  # int64 [m], rows of the call
    ids: torch.Tensor  # integer [m, M]
    coef: torch.Tensor  # float [m, M]
    distinct_rows: bool = False  # row_index names each row at most once (its layout then needs no host read)

    def __post_init__(self):
        for name, t in (("row_index", self.row_index), ("ids", self.ids), ("coef", self.coef)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"SparseTerms.{name} must be a torch.Tensor, got {type(t).__name__}")
        if self.ids.dtype.is_floating_point or self.ids.dtype == torch.bool:
            raise TypeError(f"SparseTerms.ids must be an integer tensor, got {self.ids.dtype}")
        if not self.coef.dtype.is_floating_point:
            raise TypeError(f"SparseTerms.coef must be a float tensor, got {self.coef.dtype}")
        if self.ids.dim() != 2 or self.ids.shape != self.coef.shape:
            raise ValueError(f"SparseTerms.ids {tuple(self.ids.shape)} and coef {tuple(self.coef.shape)} must be "
                             "[m, M] tensors of one shape")
        if self.row_index.shape != (self.ids.shape[0],):
            raise ValueError(f"SparseTerms.row_index must have shape ({self.ids.shape[0]},), got "
                             f"{tuple(self.row_index.shape)}")

    @classmethod
    def every_row(cls, ids: torch.Tensor, coef: torch.Tensor) -> SparseTerms:
        """Terms for rows 0..n−1 of ids/coef [n, M]."""
        return cls(torch.arange(ids.shape[0], device=ids.device), ids, coef, distinct_rows=True)


@dataclass(frozen=True)
class HeadGradCoefs:
    """∂L/∂z of a per-row loss, in the form every backward sweep evaluates:

        ∂L/∂z[n, v] = p[n, v]·(row_coef[n] + logit_coef[n]·(z[n, v] − logit_shift[n]))
                      + target_coef[n]·[v = targets[n]] + Σ sparse terms at (n, v)

    Examples: log-prob of the target (row_coef = −g, target_coef = g); entropy (logit_coef = −g,
    logit_shift = Σ p·z, subtracted per element so that a huge mean logit does not swallow the
    O(1) row coefficient); Top-K JSD (row_coef = g·c for its dense part, its support terms sparse).
    """

    row_coef: torch.Tensor  # [n]
    logit_coef: torch.Tensor | None = None  # [n]
    logit_shift: torch.Tensor | None = None  # [n]; None: 0
    targets: torch.Tensor | None = None  # int64 [n] ids in [0, V)
    target_coef: torch.Tensor | None = None  # [n]
    sparse: tuple[SparseTerms, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if (self.targets is None) != (self.target_coef is None):
            raise ValueError("targets and target_coef must be given together")

    def all_sparse(self) -> tuple[SparseTerms, ...]:
        """The sparse terms with the target one-hots as one more triple."""
        if self.targets is None:
            return tuple(self.sparse)
        target_terms = SparseTerms.every_row(self.targets[:, None], self.target_coef[:, None])
        return (*self.sparse, target_terms)


@dataclass(frozen=True)
class GradNeeds:
    """Which gradients a backward sweep must form."""

    hidden: bool = True
    weight: bool = True
    bias: bool = True

    def of(self, head: Head) -> GradNeeds:
        """These needs, with no bias gradient for a head without bias."""
        return replace(self, bias=False) if self.bias and head.bias is None else self

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


ALL_GRADS = GradNeeds()


@dataclass
class HeadGrads:
    """Gradients of one head, each in the compute dtype or in its input's dtype (see the module docstring;
    None where not needed)."""

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.hidden, self.weight, self.bias))

    def add_(self, other: HeadGrads, hidden_rows: torch.Tensor | None = None) -> HeadGrads:
        """Accumulate ``other`` in place; its hidden gradient covers ``hidden_rows`` (None: all rows). A part
        in the input's dtype is added in that dtype (one rounding of the sum, as autograd accumulates a
        bf16 ``.grad``)."""
        if self.hidden is not None and other.hidden is not None:
            if hidden_rows is None:
                self.hidden += other.hidden
            else:
                self.hidden.index_add_(0, hidden_rows, other.hidden)
        if self.weight is not None and other.weight is not None:
            self.weight += other.weight
        if self.bias is not None and other.bias is not None:
            self.bias += other.bias
        return self


@dataclass(frozen=True)
class JSDStats:
    """Full-vocabulary JSD_β per row with what its backward needs: Σ_v w (w = p·∂D/∂p) and both lse."""

    value: torch.Tensor
    w_sum: torch.Tensor
    lse: torch.Tensor
    teacher_lse: torch.Tensor


@dataclass(frozen=True)
class RowTerms:
    """The per-row terms of a block of rows of a one-sweep loss, [r] each in the compute dtype: log-prob of
    the target and entropy (None unless the loss reads them), the divergence (0 on rows without one), the
    top-K overlap and the teacher mass (None unless asked for; 0 on rows without a divergence)."""

    logp: torch.Tensor | None
    entropy: torch.Tensor | None
    jsd: torch.Tensor
    overlap: torch.Tensor | None = None
    teacher_mass: torch.Tensor | None = None


@dataclass(frozen=True)
class RowGrads:
    """∂loss_n/∂(logp_n, entropy_n, D_n) of a block's rows, [r] each (None: zero)."""

    logp: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    jsd: torch.Tensor | None = None


class RowLoss(abc.ABC):
    """A per-row loss of the per-row terms, loss_n = f_n(logp_n, entropy_n, D_n), as a one-sweep loss
    (``Backend.fused_loss``) uses it.

    The sweep calls it once per block of rows, ``row_loss(rows, terms)`` with ``rows`` a slice of the call's
    rows and ``terms`` the block's :class:`RowTerms`, and forms ∂L/∂z from the :class:`RowGrads` it returns
    (whatever else it does with the terms — record them, sum the loss — is its own business). The flags
    tell the sweep what to compute and keep:

    - ``logprobs``: it reads logp and the entropy (the sweep needs the targets);
    - ``entropy_gradient``: ∂/∂entropy may be nonzero (the sweep keeps what that gradient needs);
    - ``overlap``: record the top-K overlap and the teacher mass;
    - ``constant``: its derivatives do not depend on the terms, so the sweep may ask for them sub-block by
      sub-block (a weighted sum of divergences); else once per block, after all of the block's terms.
    """

    logprobs: bool = False
    entropy_gradient: bool = False
    overlap: bool = False
    constant: bool = False

    @abc.abstractmethod
    def __call__(self, rows: slice, terms: RowTerms) -> RowGrads:
        """The derivatives of the rows' losses (see the class doc)."""


class WeightedDivergence(RowLoss):
    """loss_n = weights_n · D_n: the loss functions ``linear_jsd_loss`` and ``linear_topk_jsd_loss``."""

    constant = True

    def __init__(self, weights: torch.Tensor):
        self.weights = weights

    def __call__(self, rows: slice, terms: RowTerms) -> RowGrads:
        return RowGrads(jsd=self.weights[rows])


def as_row_loss(row_loss) -> RowLoss:
    """A :class:`RowLoss`; a tensor of row weights is :class:`WeightedDivergence`."""
    return WeightedDivergence(row_loss) if isinstance(row_loss, torch.Tensor) else row_loss


@dataclass(frozen=True)
class DivergenceSpec:
    """Which divergence a loss sums: the full JSD_β (k None) or the Top-K JSD of docs/method.md §2."""

    beta: float
    k: int | None = None
    support: str = "union"
    tail: bool = True


class Backend(abc.ABC):
    """One implementation of the vocabulary sweeps (see the module docstring)."""

    name: str

    @abc.abstractmethod
    def row_stats(self, head: Head, *, targets: torch.Tensor | None = None, k: int = 0,
                  with_mean_logit: bool = True, lse_dtype: torch.dtype | None = None) -> RowStats:
        """lse, Σ p·z (``with_mean_logit``), the logit at ``targets`` (int64 ids in [0, V)) and the
        top-``k`` ids/logits (0 ≤ k ≤ V) of every row, from one sweep. ``lse_dtype`` (default: the
        compute dtype): float64 keeps lse unrounded, so that z − lse of the sweep's own logits is exact."""

    def gather_logits(self, head: Head, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """z at ``ids`` [n, M] (ids in [0, V)), in ``dtype``: O(n·M·H) work, no sweep."""
        from .gather import gather_logits

        return gather_logits(head, ids, dtype)

    @abc.abstractmethod
    def head_backward(self, head: Head, lse: torch.Tensor, coefs: HeadGradCoefs, needs: GradNeeds) -> HeadGrads:
        """Gradients w.r.t. the head's hidden, weight and bias of a loss with ∂L/∂z given by ``coefs``
        (p = exp(z − lse)), from one sweep that recomputes the logits."""

    @abc.abstractmethod
    def jsd_forward(self, student: Head, teacher: Head, beta: float, *, lse: torch.Tensor | None = None,
                    teacher_lse: torch.Tensor | None = None) -> JSDStats:
        """Full-vocabulary JSD_β per row. ``lse``/``teacher_lse``: the rows' logsumexps when the
        caller has them (else the backend computes them)."""

    @abc.abstractmethod
    def jsd_backward(self, student: Head, teacher: Head, beta: float, stats: JSDStats, grad: torch.Tensor,
                     needs: GradNeeds) -> HeadGrads:
        """Gradients of Σ_n grad_n·JSD_n w.r.t. the student head: ∂/∂z = grad·(w − p·Σw)."""

    def fused_loss_pays(self, student: Head, teacher: Head | None = None) -> bool:
        """Whether ``fused_loss`` beats the per-row path for this head (and teacher; None: a loss of the
        student's terms alone) (False: not offered)."""
        return False

    def fused_loss(self, student: Head, teacher: Head | None, divergence: DivergenceSpec | None, row_loss,
                   needs: GradNeeds, *, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, HeadGrads]:
        """The gradients of Σ_n loss_n from one sweep over blocks of whole rows; returns (the per-row
        divergence D [n], 0 where none, and the gradients).

        ``row_loss``: a :class:`RowLoss`, or a tensor of row weights (Σ_n weights_n·D_n). ``teacher``: the
        teacher's head on the FIRST ``teacher.rows`` rows of the student's (the rows with a divergence), or
        None (no divergence). ``targets`` [n]: the rows' targets, when the loss reads log-probs.
        ``divergence.k`` None (the full JSD) only with a loss of D alone."""
        raise NotImplementedError(f"the {self.name} backend has no one-sweep loss")
