"""Input checks shared by the public functions and by the reference.

Each error names the offending argument (docs/api.md, Errors): ValueError for bad values and shapes,
TypeError for bad types and dtypes. Checks of types, shapes, devices and Python values read no
device memory. The checks of id values (targets and sparse-teacher ids in [0, V), no repeated
id) come in two forms: on host numbers the caller read once (``check_target_range``,
``check_sparse_teacher_ids``: the public functions read them with the rest of a call's one host
read) and eager ones that read the tensors themselves (``check_targets``, ``check_sparse_teacher``:
the reference).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .backends.registry import check_backend_name

#: The supports of the Top-K JSD (docs/method.md §2): TopK(p) ∪ TopK(q), TopK(q), TopK(p).
SUPPORTS = ("union", "teacher", "student")


def check_backend(backend) -> None:
    """"auto" or a registered backend's name (``backends.registry``)."""
    check_backend_name(backend)


def _check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")


def _check_float(name: str, x: torch.Tensor) -> None:
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_linear(hidden, weight, bias, *, prefix: str = "") -> tuple[int, int, int]:
    """hidden [N, H], weight [V, H], bias [V] or None, same dtype. Returns (N, H, V)."""
    h_name, w_name, b_name = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    _check_tensor(h_name, hidden, 2)
    _check_tensor(w_name, weight, 2)
    _check_float(h_name, hidden)
    _check_float(w_name, weight)
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{h_name} has {hidden.shape[1]} features but {w_name} expects {weight.shape[1]} "
            f"({h_name} {tuple(hidden.shape)}, {w_name} {tuple(weight.shape)})"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{h_name} ({hidden.dtype}) and {w_name} ({weight.dtype}) must have the same dtype "
                        "(under torch.autocast both are cast to its dtype, as nn.Linear's are)")
    if hidden.device != weight.device:
        raise ValueError(f"{h_name} is on {hidden.device} but {w_name} is on {weight.device}")
    if bias is not None:
        _check_tensor(b_name, bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{b_name} has {bias.shape[0]} entries but {w_name} has {weight.shape[0]} rows")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{b_name} ({bias.dtype}) and {w_name} ({weight.dtype}) must have the same dtype")
        if bias.device != weight.device:
            raise ValueError(f"{b_name} is on {bias.device} but {w_name} is on {weight.device}")
    if weight.shape[0] < 1:
        raise ValueError(f"{w_name} must have at least one row (vocabulary size ≥ 1)")
    return hidden.shape[0], hidden.shape[1], weight.shape[0]


def check_logits(name: str, logits) -> tuple[int, int]:
    _check_tensor(name, logits, 2)
    _check_float(name, logits)
    if logits.shape[1] < 1:
        raise ValueError(f"{name} must have a vocabulary of size ≥ 1, got shape {tuple(logits.shape)}")
    return logits.shape[0], logits.shape[1]


def check_same_rows(name: str, x: torch.Tensor, n: int, ref_name: str = "hidden") -> None:
    if x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} rows but {ref_name} has {n}")


def check_same_device(reference: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but the student inputs are on {reference.device}")


def check_teacher_vocab(vocab: int, teacher_vocab: int, name: str = "teacher_weight") -> None:
    if teacher_vocab != vocab:
        raise ValueError(f"{name} has vocabulary {teacher_vocab} but the student has {vocab}")


def _real(name: str, x) -> float:
    """A real number (Python, NumPy or a one-element tensor; not a bool) as a float."""
    if isinstance(x, torch.Tensor):
        if x.requires_grad:
            raise TypeError(f"{name} is a tensor that requires grad: ptd does not differentiate w.r.t. {name}; "
                            "pass a number (or a detached tensor)")
        if x.numel() == 1 and not x.dtype.is_complex:
            x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    return float(x)


def check_temperature(temperature) -> float:
    temperature = _real("temperature", temperature)
    if not (temperature > 0) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return temperature


def check_beta(beta) -> float:
    beta = _real("beta", beta)
    if not (0.0 <= beta <= 1.0):
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    return beta


def check_logit_scale(name: str, scale) -> float:
    scale = _real(name, scale)
    if not (scale > 0) or not math.isfinite(scale):
        raise ValueError(f"{name} must be a finite number > 0, got {scale}")
    return scale


def check_softcap(name: str, softcap) -> float | None:
    if softcap is None:
        return None
    softcap = _real(name, softcap)
    if not (softcap > 0) or not math.isfinite(softcap):
        raise ValueError(f"{name} must be None or a finite number > 0, got {softcap}")
    return softcap


def check_bool(name: str, flag) -> bool:
    """True/False (Python or NumPy); a string or a number is a mistake, not a truth value."""
    if isinstance(flag, (bool, np.bool_)):
        return bool(flag)
    raise TypeError(f"{name} must be True or False, got {flag!r}")


def check_k(k) -> int:
    if isinstance(k, torch.Tensor) and k.numel() == 1 and not k.is_floating_point():
        k = k.item()
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    return int(k)


def check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return int(ignore_index)


def check_support(support) -> str:
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    return support


def check_targets_tensor(targets, n: int, device: torch.device) -> torch.Tensor:
    """Integer targets of the rows (their values are checked by ``check_target_range``). Returns them as
    int64: compared in a narrow dtype, ``ignore_index`` and V would wrap (−100 is 156 in uint8, 200 is −56
    in int8)."""
    _check_tensor("targets", targets, 1)
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    check_same_rows("targets", targets, n)
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but the student inputs are on {device}")
    return targets.long()


def check_target_range(low: int, high: int, vocab: int, ignore_index: int) -> None:
    """The smallest and largest target of the rows that are not ``ignore_index`` lie in [0, V)."""
    if low < 0 or high >= vocab:
        bad = int(low if low < 0 else high)
        raise ValueError(f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {bad}")


def check_targets(targets, n: int, vocab: int, ignore_index: int, device: torch.device) -> torch.Tensor:
    """``check_targets_tensor`` and ``check_target_range``, reading the targets (the reference's form)."""
    ignore_index = check_ignore_index(ignore_index)
    targets = check_targets_tensor(targets, n, device)
    live = targets[targets != ignore_index]
    if live.numel():
        check_target_range(int(live.min()), int(live.max()), vocab, ignore_index)
    return targets


def check_mask(name: str, mask, n: int, device: torch.device) -> None:
    if mask is None:
        return
    _check_tensor(name, mask, 1)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {mask.dtype}")
    check_same_rows(name, mask, n)
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the student inputs are on {device}")


def check_weights(weights, n: int, device: torch.device) -> None:
    if weights is None:
        return
    _check_tensor("weights", weights, 1)
    _check_float("weights", weights)
    check_same_rows("weights", weights, n)
    if weights.device != device:
        raise ValueError(f"weights is on {weights.device} but the student inputs are on {device}")


def check_sparse_teacher_tensors(teacher_indices, teacher_logprobs, n: int, device: torch.device) -> int:
    """Types, shapes and devices of a sparse teacher (its id values: ``check_sparse_teacher_ids``). Returns K."""
    _check_tensor("teacher_indices", teacher_indices, 2)
    _check_tensor("teacher_logprobs", teacher_logprobs, 2)
    if teacher_indices.dtype.is_floating_point or teacher_indices.dtype == torch.bool:
        raise TypeError(f"teacher_indices must be an integer tensor, got {teacher_indices.dtype}")
    _check_float("teacher_logprobs", teacher_logprobs)
    check_same_rows("teacher_indices", teacher_indices, n)
    if teacher_logprobs.shape != teacher_indices.shape:
        raise ValueError(
            f"teacher_logprobs {tuple(teacher_logprobs.shape)} must match teacher_indices "
            f"{tuple(teacher_indices.shape)}"
        )
    for name, t in (("teacher_indices", teacher_indices), ("teacher_logprobs", teacher_logprobs)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the student inputs are on {device}")
    if teacher_indices.shape[1] < 1:
        raise ValueError("teacher_indices must hold at least one id per row")
    return teacher_indices.shape[1]


def sparse_teacher_id_facts(teacher_indices: torch.Tensor) -> torch.Tensor:
    """[smallest id, largest id, whether a row repeats an id] of non-empty ids, on their device (no host read)."""
    ordered = teacher_indices.long().sort(dim=-1).values  # compared as int64: V would wrap in a narrow dtype
    repeats = (ordered[:, 1:] == ordered[:, :-1]).any() if ordered.shape[1] > 1 else ordered.new_zeros((), dtype=bool)
    return torch.stack([ordered[:, 0].min(), ordered[:, -1].max(), repeats.long()])


def check_sparse_teacher_ids(low: int, high: int, repeats: bool, vocab: int) -> None:
    if low < 0 or high >= vocab:
        raise ValueError(f"teacher_indices must lie in [0, {vocab})")
    if repeats:
        raise ValueError("teacher_indices must not repeat an id within a row")


def check_sparse_teacher(teacher_indices, teacher_logprobs, n: int, vocab: int, device: torch.device) -> int:
    """``check_sparse_teacher_tensors`` and ``check_sparse_teacher_ids``, reading the ids (the reference's form)."""
    k = check_sparse_teacher_tensors(teacher_indices, teacher_logprobs, n, device)
    if teacher_indices.numel():
        low, high, repeats = sparse_teacher_id_facts(teacher_indices).tolist()
        check_sparse_teacher_ids(low, high, bool(repeats), vocab)
    return k


def check_student(hidden, weight, bias, temperature) -> tuple[int, int, float]:
    """The student output layer and τ. Returns (N, V, τ)."""
    n, _, vocab = check_linear(hidden, weight, bias)
    return n, vocab, check_temperature(temperature)


def check_teacher(hidden, vocab: int, teacher_hidden, teacher_weight, teacher_bias) -> None:
    """A teacher output layer beside the student's: same rows, same vocabulary, same device."""
    check_linear(teacher_hidden, teacher_weight, teacher_bias, prefix="teacher_")
    check_same_rows("teacher_hidden", teacher_hidden, hidden.shape[0])
    check_teacher_vocab(vocab, teacher_weight.shape[0])
    check_same_device(hidden, teacher_hidden=teacher_hidden)


def check_logits_pair(logits, teacher_logits) -> tuple[int, int]:
    """Student and teacher logits of the same shape and device. Returns (N, V)."""
    n, vocab = check_logits("logits", logits)
    _, teacher_vocab = check_logits("teacher_logits", teacher_logits)
    check_same_rows("teacher_logits", teacher_logits, n, "logits")
    check_teacher_vocab(vocab, teacher_vocab, "teacher_logits")
    check_same_device(logits, teacher_logits=teacher_logits)
    return n, vocab


def row_mask(n: int, device, targets=None, ignore_index: int = -100, mask=None) -> torch.Tensor:
    """The rows that produce output: target ≠ ignore_index and mask True."""
    live = torch.ones(n, dtype=torch.bool, device=device)
    if targets is not None:
        live &= targets.long() != ignore_index
    if mask is not None:
        live &= mask
    return live
