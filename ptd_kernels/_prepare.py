"""The one preparation step of every public call (``functional``, ``logits_level``).

``prepared(function, arguments)`` takes a public function's name and its arguments (its ``locals()``) and
yields a ``Call`` (``autograd.common``) that the autograd layer runs:

1. the output layer: DTensor layers become local tensors and bring their process group; under
   ``torch.autocast`` the layers are cast to its dtype (as ``nn.Linear``'s are) and the call runs with
   autocast off, so every GEMM sees one dtype and the divergence math stays in float32;
2. every argument is checked once, by name (``_validate``: ValueError/TypeError naming it), and the
   backend is selected from the registry (``backends.registry``);
3. the backends open the call (``backends.call.open_call``): with a process group, the ranks agree on
   every argument in one exchange and the backend is wrapped for the vocabulary slice; the few device
   values the call needs on the host (live-row counts, id ranges) are read once, with that exchange or
   alone — or not at all under ``config.SYNC_FREE``;
4. the checks that need the full vocabulary size V (ids in [0, V), k ≤ V), the rows that go in, the
   sweep config and both sides' heads.
"""

from __future__ import annotations

import contextlib
import math

import torch

from . import _validate as validate
from . import config
from ._host_reads import free_to_read
from .autograd.common import Call, Rows, SweepConfig
from .backends.base import DivergenceSpec, Head, LogitSpec, same_data
from .backends.call import Checked, open_call
from .backends.registry import select_backend
from .backends.vocab_parallel_setup import Agreement

LAYERS = ("hidden", "weight", "bias", "teacher_hidden", "teacher_weight", "teacher_bias")
_SLICED = ("weight", "bias", "teacher_weight", "teacher_bias")
# Tensor arguments every rank of a vocabulary-parallel call passes alike, and their number of dims.
_REPLICATED = {"hidden": 2, "teacher_hidden": 2, "logits": 2, "teacher_logits": 2, "targets": 1, "mask": 1,
               "jsd_mask": 1, "weights": 1, "teacher_indices": 2, "teacher_logprobs": 2, "ids": 2}
_LAYER_DIMS = {"weight": 2, "bias": 1, "teacher_weight": 2, "teacher_bias": 1}
_NO_VALUE = math.inf  # a summary's id range over no row


@contextlib.contextmanager
def prepared(function: str, arguments: dict):
    """Check and prepare one call of the public ``function`` (see the module docstring); yields its ``Call``,
    with autocast off while the call runs when it was on."""
    args = dict(arguments)
    if function == "linear_policy_loss":
        _without_absent_teacher(args)
    autocast_device = autocast_dtype = None
    hidden = args.get("hidden")
    if isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type):
        autocast_device = hidden.device.type
        autocast_dtype = torch.get_autocast_dtype(autocast_device)
    call = _prepare(function, args, autocast_dtype)
    if autocast_device is None:
        yield call
    else:
        with torch.autocast(autocast_device, enabled=False):
            yield call


def _prepare(function: str, args: dict, autocast_dtype) -> Call:
    layers = {name: args[name] for name in LAYERS if name in args}
    opened = open_call(function, args["backend"], args.get("process_group"), layers,
                       lambda local: _check(function, {**args, **local}, autocast_dtype), words=validate.SUPPORTS)
    checked, summary, vocab = opened.arguments, opened.summary, opened.vocab
    # Checks that need the full vocabulary: deterministic on every rank (their inputs were agreed on).
    if summary is not None:
        if "target low" in summary:
            if summary["target low"] != _NO_VALUE:  # some row has a target
                validate.check_target_range(int(summary["target low"]), int(summary["target high"]), vocab,
                                            checked["ignore_index"])
        if "id low" in summary and summary["id low"] != _NO_VALUE:
            low, high = int(summary["id low"]), int(summary["id high"])
            if low < 0 or high >= vocab:
                raise ValueError(f"ids must lie in [0, {vocab}) (the vocabulary); found {low if low < 0 else high}")
        if "teacher id low" in summary:
            validate.check_sparse_teacher_ids(int(summary["teacher id low"]), int(summary["teacher id high"]),
                                              bool(summary["teacher id repeats"]), vocab)
    k = checked.get("k")
    if function == "linear_topk" and k > vocab:
        raise ValueError(f"k={k} exceeds the vocabulary size {vocab}")
    return Call(opened.backend, _sweep_config(function, checked, vocab), _rows(checked, summary), vocab,
                student=_head(checked, ""), teacher=_head(checked, "teacher_"),
                targets=checked.get("live_targets"), k=k if function == "linear_topk" else None,
                teacher_indices=checked.get("teacher_indices"), teacher_logprobs=checked.get("teacher_logprobs"),
                weights=checked.get("weights"), logits=checked.get("logits"),
                teacher_logits=checked.get("teacher_logits"), with_entropy=checked.get("with_entropy", False),
                row_loss=checked.get("row_loss"))


# ----------------------------------------------------------------------------- checks

_TEACHER_ARGUMENTS = ("teacher_hidden", "teacher_weight", "teacher_bias", "teacher_logit_scale", "teacher_softcap",
                      "k", "beta", "support", "tail", "jsd_mask")


def _without_absent_teacher(args: dict) -> None:
    """``linear_policy_loss`` without a teacher is a loss of log-probs and entropies alone: its teacher's
    arguments go (checked to be absent or at their defaults first)."""
    if args["teacher_hidden"] is not None:
        if args["teacher_weight"] is None:
            raise ValueError("teacher_weight is None but teacher_hidden is given: pass the teacher's output layer")
        if args["k"] is None:
            raise ValueError("k is None: with a teacher, give the K of the Top-K support (e.g. 100)")
        return
    for name in ("teacher_weight", "teacher_bias", "jsd_mask"):
        if args[name] is not None:
            raise ValueError(f"{name} is given but teacher_hidden is None: without a teacher there is no divergence "
                             "(pass teacher_hidden too, or leave it out)")
    for name in _TEACHER_ARGUMENTS:
        args.pop(name, None)


def _check_ids(ids, n: int, device) -> torch.Tensor:
    """``linear_logprobs_at``'s ids: an integer tensor [N, M] on the student's device (its values are checked
    against V with the call's one read). Returns them as int64."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dim() != 2 or ids.shape[0] != n:
        raise ValueError(f"ids must be an [N={n}, M] tensor (M ids per row of hidden), got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"ids is on {ids.device} but the student inputs are on {device}")
    return ids.long()


def _check_row_loss(row_loss, n: int, device):
    """A ``PolicyLoss`` (its fields checked for N rows) or a callable ``row_loss(logp, entropy, jsd)``."""
    from .policy_loss import PolicyLoss

    if isinstance(row_loss, PolicyLoss):
        return row_loss.checked(n, device)
    if not callable(row_loss):
        raise TypeError(f"row_loss must be a ptd_kernels.PolicyLoss or a callable row_loss(logp, entropy, jsd) -> "
                        f"loss [N], got {type(row_loss).__name__}")
    return row_loss


def _cast_layers(args: dict, dtype: torch.dtype) -> None:
    """Autocast's rule for the output layers: float32/16 operands in its dtype (float64 ones stay); a shared
    output layer stays one tensor (one weight read)."""
    cast = {}
    for name in LAYERS:
        t = args.get(name)
        if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float16, torch.bfloat16):
            cast[name] = t.to(dtype)
    for side in ("weight", "bias"):
        student, teacher = args.get(side), args.get("teacher_" + side)
        if side in cast and isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor) and \
                same_data(student, teacher):
            cast["teacher_" + side] = cast[side].detach()
    args.update(cast)


def _check(function: str, args: dict, autocast_dtype) -> Checked:
    """Every argument of the call, checked by name in one order (the first error is the one raised), the
    backend selected, and the call's agreement (what must be equal on every rank, and its summary)."""
    if autocast_dtype is not None:
        _cast_layers(args, autocast_dtype)
    out = dict(args)
    validate.check_backend(args["backend"])
    if "hidden" in args:
        n, _, vocab = validate.check_linear(args["hidden"], args["weight"], args.get("bias"))
        device = args["hidden"].device
    else:
        n, vocab = (validate.check_logits_pair(args["logits"], args["teacher_logits"]) if "teacher_logits" in args
                    else validate.check_logits("logits", args["logits"]))
        device = args["logits"].device
    out["temperature"] = validate.check_temperature(args["temperature"])
    if "teacher_hidden" in args:
        validate.check_teacher(args["hidden"], vocab, args["teacher_hidden"], args["teacher_weight"],
                               args.get("teacher_bias"))
    for prefix in ("", "teacher_"):
        scale, cap = prefix + "logit_scale", prefix + "softcap"
        if scale in args:
            out[scale] = validate.check_logit_scale(scale, args[scale])
            out[cap] = validate.check_softcap(cap, args[cap])
    if "beta" in args:
        out["beta"] = validate.check_beta(args["beta"])
    validate.check_mask("mask", args.get("mask"), n, device)
    if "k" in args:
        out["k"] = validate.check_k(args["k"])
    if "support" in args:
        out["support"] = validate.check_support(args["support"])
    if "tail" in args:
        out["tail"] = validate.check_bool("tail", args["tail"])
    if "ignore_index" in args:
        out["ignore_index"] = validate.check_ignore_index(args["ignore_index"])
    if args.get("targets") is not None:
        out["targets"] = validate.check_targets_tensor(args["targets"], n, device)
    if "with_entropy" in args:
        out["with_entropy"] = validate.check_bool("with_entropy", args["with_entropy"])
    validate.check_mask("jsd_mask", args.get("jsd_mask"), n, device)
    validate.check_weights(args.get("weights"), n, device)
    if "row_loss" in args:
        out["row_loss"] = _check_row_loss(args["row_loss"], n, device)
    if "ids" in args:
        out["teacher_indices"] = _check_ids(args.pop("ids"), n, device)
        out.pop("ids", None)
    if "teacher_indices" in args:
        validate.check_sparse_teacher_tensors(args["teacher_indices"], args["teacher_logprobs"], n, device)
        out["teacher_indices"] = args["teacher_indices"].long()
        out["teacher_logprobs"] = args["teacher_logprobs"]
    backend = None
    if "hidden" in args:
        backend = select_backend(args["backend"], *(args.get(name) for name in LAYERS), function=function)
    summary = _live_rows(out, n)
    return Checked(out, backend, vocab, summary, lambda: _agreement(function, out, vocab, summary))


def _live_rows(out: dict, n: int) -> list[tuple[str, torch.Tensor]]:
    """The rows that produce output (into ``out``: live, jsd_live, live_targets) and the device values the
    call reads once: live-row counts and id ranges. No host read here."""
    targets, mask = out.get("targets"), out.get("mask")
    live = None
    summary = []
    if targets is not None:
        has_target = targets != out["ignore_index"]
        summary += _id_range("target", targets, has_target, n)
        live = has_target
        out["live_targets"] = torch.where(has_target, targets, 0)  # a valid id in masked rows
    if mask is not None:
        live = mask if live is None else live & mask
    if live is not None:
        summary.append(("live rows", live.sum()))
    jsd_live = None
    if out.get("jsd_mask") is not None:
        jsd_live = out["jsd_mask"] if live is None else live & out["jsd_mask"]
        summary.append(("jsd rows", jsd_live.sum()))
    ids = out.get("teacher_indices")
    if ids is not None and "teacher_logprobs" not in out:  # linear_logprobs_at's ids: their range, over live rows
        valid = torch.ones_like(ids, dtype=torch.bool) if live is None else live[:, None].expand_as(ids)
        summary += _id_range("id", ids, valid, ids.numel())
    elif ids is not None:
        if ids.numel():
            facts = validate.sparse_teacher_id_facts(ids).to(torch.float64)
        else:
            facts = torch.zeros(3, dtype=torch.float64, device=ids.device)
        summary += [("teacher id low", facts[0]), ("teacher id high", facts[1]), ("teacher id repeats", facts[2])]
    out["live"], out["jsd_live"] = live, jsd_live
    return summary


def _id_range(name: str, ids: torch.Tensor, valid: torch.Tensor, n: int) -> list[tuple[str, torch.Tensor]]:
    """The smallest and largest of ``ids`` where ``valid`` (+inf, −inf over no row), on the device."""
    if n == 0:
        none = torch.full((), _NO_VALUE, dtype=torch.float64, device=ids.device)
        return [(f"{name} low", none), (f"{name} high", -none)]
    wide = ids.to(torch.float64)
    low = torch.where(valid, wide, _NO_VALUE).amin()
    high = torch.where(valid, wide, -_NO_VALUE).amax()
    return [(f"{name} low", low), (f"{name} high", high)]


def _agreement(function: str, out: dict, vocab: int, summary) -> Agreement:
    """What every rank of a vocabulary-parallel call must pass alike, in the order of the arguments."""
    fields, replicated = [], []
    for name, value in out.items():
        if name in ("backend", "process_group", "live", "jsd_live", "live_targets"):
            continue
        if name == "row_loss":
            _agree_on_row_loss(value, fields, replicated)
            continue
        dims = _REPLICATED.get(name, _LAYER_DIMS.get(name))
        if dims is None:
            fields.append((name, None, value))
            continue
        tensor = value if isinstance(value, torch.Tensor) else None
        fields.append((name, "dtype", None if tensor is None else tensor.dtype))
        for dim in range(1 if name in _SLICED else 0, dims):
            fields.append((name, f"size of dim {dim}", 0 if tensor is None else tensor.shape[dim]))
        if name in _REPLICATED:
            replicated.append((name, tensor))
    fields.append(("backend", None, out["backend"]))
    return Agreement(function, vocab, fields, _SLICED, replicated, summary)


def _agree_on_row_loss(row_loss, fields: list, replicated: list) -> None:
    """A PolicyLoss's numbers are agreed on and its tensors fingerprinted (every rank passes the same rows);
    a callable is the caller's to keep alike."""
    from .policy_loss import PolicyLoss

    if not isinstance(row_loss, PolicyLoss):
        fields.append(("row_loss", "kind", "callable"))
        return
    fields.append(("row_loss", "kind", "PolicyLoss"))
    for name in ("epsilon_low", "epsilon_high", "kl_coef", "ptd_coef", "entropy_coef", "kl_ratio"):
        fields.append((f"row_loss.{name}", None, getattr(row_loss, name)))
    tokens = row_loss.ptd_tokens
    if isinstance(tokens, torch.Tensor):
        replicated.append(("row_loss.ptd_tokens", tokens.reshape(1)))
    else:
        fields.append(("row_loss.ptd_tokens", None, tokens))
    for name in PolicyLoss.ROW_FIELDS:
        tensor = getattr(row_loss, name)
        fields.append((f"row_loss.{name}", "dtype", None if tensor is None else tensor.dtype))
        replicated.append((f"row_loss.{name}", tensor))


# ----------------------------------------------------------------------------- the call


def _sweep_config(function: str, checked: dict, vocab: int) -> SweepConfig:
    temperature = checked["temperature"]
    student = LogitSpec(temperature, checked.get("logit_scale", 1.0), checked.get("softcap"))
    teacher = None
    if "teacher_hidden" in checked or "teacher_logits" in checked:
        teacher = LogitSpec(temperature, checked.get("teacher_logit_scale", 1.0), checked.get("teacher_softcap"))
    divergence = None
    if "beta" in checked:
        if "teacher_indices" in checked:  # a sparse teacher: its ids are the support
            divergence = DivergenceSpec(checked["beta"], checked["teacher_indices"].shape[1], "teacher",
                                        checked["tail"])
        else:
            k = checked.get("k")
            divergence = DivergenceSpec(checked["beta"], None if k is None or k >= vocab else k,
                                        checked.get("support", "union"), checked.get("tail", True))
    logprobs = "targets" in checked and function != "linear_topk"
    overlap = function == "linear_ptd_terms" or (function == "linear_policy_loss" and teacher is not None)
    return SweepConfig(student, teacher, divergence, logprobs=logprobs, overlap=overlap)


def _rows(checked: dict, summary: dict | None) -> Rows:
    """The rows that go in: the live ones stripped when their count was read, else every row (masked ones
    zeroed: the sync-free path)."""
    n = (checked.get("hidden") if "hidden" in checked else checked["logits"]).shape[0]
    live, jsd_live = checked["live"], checked["jsd_live"]
    if summary is None or live is None and jsd_live is None:
        return Rows(n, live, None, jsd_live, None)
    n_live = int(summary["live rows"]) if live is not None else n
    index = None
    if n_live < n:
        index = _first_true(live, n_live)
    elif live is not None:
        live = None  # every row is live
    jsd_rows = None
    if jsd_live is not None:
        n_jsd = int(summary["jsd rows"])
        if n_jsd < n_live:
            jsd_rows = _first_true(jsd_live if index is None else jsd_live.index_select(0, index), n_jsd)
    return Rows(n, live, index, None, jsd_rows)


def _first_true(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The ids of the ``count`` True entries of ``mask``, ascending (on a device a stable sort: no host read)."""
    if free_to_read(mask):
        return mask.nonzero().squeeze(1)
    return torch.argsort((~mask).to(torch.uint8), stable=True)[:count]


def _head(checked: dict, prefix: str) -> Head | None:
    hidden = checked.get(prefix + "hidden")
    if hidden is None:
        return None
    spec = LogitSpec(checked["temperature"], checked.get(prefix + "logit_scale", 1.0), checked.get(prefix + "softcap"))
    return Head(hidden, checked[prefix + "weight"], checked.get(prefix + "bias"), spec)


__all__ = ["prepared", "config"]
