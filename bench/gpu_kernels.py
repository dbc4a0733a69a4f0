"""The work of a recorded Triton launch: FLOPs, bytes, atomics, from its launch plan.

Two kinds of kernels:

- **ptd's fused tile kernels** (``_row_stats_kernel``, ``_jsd_forward_kernel``: a program owns BLOCK_N
  rows and sweeps one vocabulary segment; ``_head_backward_kernel``, ``_jsd_backward_kernel``: a
  persistent program owns blocks of gradient rows — of ∂hidden, or of ∂weight and ∂bias — and sweeps
  the other axis, buffering CHUNK entries of da before it adds buffer @ operand into its rows). Every
  logits tile is formed with ``tl.dot`` over the hidden size in BLOCK_H steps. From the grid and the
  constexprs: dot FLOPs (padded tiles included: the tensor cores compute them), the tile loads from
  L2, the gradient rows' read-modify-writes (no atomics), an instruction count of the per-logit
  epilogue, and the HBM traffic from a simulated L2 (below).
- **every other Triton kernel** (peers' elementwise kernels, and any kernel without ``tl.dot``): the
  kernel's source says which pointer arguments it loads, stores and updates atomically; each is
  taken as moving its whole tensor once per loop that touches it (a row-per-program streaming
  kernel). Branches on constexprs are resolved with the launch's values; a runtime branch that
  ends in ``return`` (a masked-row early exit) is taken as not taken (the modelled data masks no row).

A fused kernel not modelled here raises ``UnmodelledKernel``: its tile plan has to be written down
(a few lines: see ``_FUSED``), not guessed.

**L2 assumption.** Programs run in waves of ``sms × ctas_per_sm`` consecutive program ids (one CTA per
SM for these kernels: 8 warps and 48–196 KiB of shared memory each), and the programs of a wave
advance together. The L2 is a least-recently-used cache of ``Chip.l2_bytes`` holding whole tiles:
hidden and weight tiles are read from HBM on a miss; a block of gradient rows is read on its first
touch, kept while it is reused, and written back when evicted (and at the end). Tiles touched by
several programs of one wave are fetched once. A backward program's chunk buffer (≤ 256 KiB) is
taken to stay in L2: its writes and re-reads are L2 traffic only.
"""

from __future__ import annotations

import ast
import inspect
import math
import textwrap
from collections import OrderedDict, defaultdict
from dataclasses import dataclass

from gpu_work import TensorArg, TritonLaunch, Work


class UnmodelledKernel(RuntimeError):
    """A Triton kernel with tensor-core dots and no tile model here."""


@dataclass(frozen=True)
class Chip:
    """What a launch plan's cost depends on: SMs (waves) and the L2 capacity the simulation uses."""

    sms: int = 132
    l2_bytes: int = 40 << 20  # of 50 MB physical: two 25 MB partitions, some of it duplicated across them
    ctas_per_sm: int = 1


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pad(x: int, block: int) -> int:
    return cdiv(x, block) * block


# ----------------------------------------------------------------------------- the L2 simulation


class L2:
    """A least-recently-used cache of whole tiles; counts HBM reads (misses) and write-backs."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.lines: OrderedDict = OrderedDict()  # key -> [bytes, dirty]
        self.used = 0
        self.read = 0
        self.written = 0

    def touch(self, key, nbytes: int, dirty: bool = False):
        line = self.lines.get(key)
        if line is not None:
            self.lines.move_to_end(key)
            line[1] = line[1] or dirty
            return
        self.read += nbytes
        self.lines[key] = [nbytes, dirty]
        self.used += nbytes
        while self.used > self.capacity and len(self.lines) > 1:
            _, (size, was_dirty) = self.lines.popitem(last=False)
            self.used -= size
            if was_dirty:
                self.written += size

    def flush(self):
        self.written += sum(size for size, dirty in self.lines.values() if dirty)
        self.lines.clear()
        self.used = 0


# ----------------------------------------------------------------------------- per-logit instruction counts

# Instructions per logit of each kernel's epilogue (fp32/int32 ALU; transcendentals separately), read
# from the kernels: the online logsumexp (max, subtract, exp, rescale, add, masks), Σ p·z (+3), the target
# compare (+3), the soft-cap (tanh: an exp, a divide and ~8 more), the top-K key packing and its
# threshold test (+11); the backward's p·coefficient, one-hot and sparse adds and cast (~12); the JSD's
# pointwise terms (two exps, a log-add-exp, ~30 ALU) and its chain rule (+6).
EPILOGUE_ALU = {"row_stats": 8, "mean": 3, "targets": 3, "cap": 10, "topk": 11, "head_backward": 12,
                "jsd_forward": 30, "jsd_backward": 36}
EPILOGUE_SFU = {"row_stats": 1, "cap": 2, "head_backward": 1, "jsd": 4}
# One step of the running top-K merge (``row_stats._merge_topk``): a max over the tile's int64 keys, the
# compare and select that drops it, the count of keys left above the threshold (~3 int32 instructions
# each per key of the tile), and the argmin / min / select over the row's K_PAD kept keys (~4 each).
STEP_INSTRUCTIONS_PER_KEY, STEP_INSTRUCTIONS_PER_KEPT = 9, 12


def topk_merge_instructions(block_n: int, block_v: int, k_pad: int, tiles: int) -> float:
    """Instructions of the running top-K merge over ``tiles`` tiles of one program (a model).

    A tile costs a test of its keys against the rows' thresholds, then one step per key moved in,
    for the row with the most: K_PAD steps fill the first tiles, then about K/t keys of tile t beat a
    row's K-th largest (random order), so K_PAD·(1 + ln tiles) steps in all, plus one per tile for the
    rows of a block that do not move together.
    """
    steps = k_pad * (1 + math.log(max(tiles, 1))) + tiles
    per_step = block_n * (block_v * STEP_INSTRUCTIONS_PER_KEY + k_pad * STEP_INSTRUCTIONS_PER_KEPT)
    return tiles * block_n * block_v * 3 + steps * per_step


# ----------------------------------------------------------------------------- ptd's fused tile kernels


def _row_stats(launch: TritonLaunch, chip: Chip) -> Work:
    args = launch.args
    n, v, h = args["N"], args["V"], args["H"]
    bn, bv, bh = args["BLOCK_N"], args["BLOCK_V"], args["BLOCK_H"]
    row_blocks, segments = launch.grid[0], launch.grid[1]
    tiles_per_segment = args["TILES_PER_SEG"]
    num_tiles = cdiv(v, bv)
    hidden, weight = args["h_ptr"], args["w_ptr"]
    depth = pad(h, bh)
    tiles = row_blocks * num_tiles
    hidden_tile, weight_tile = bn * depth * hidden.itemsize, bv * depth * weight.itemsize
    logits = tiles * bn * bv
    per_logit = (EPILOGUE_ALU["row_stats"] + EPILOGUE_ALU["mean"] * bool(args["WITH_MEAN"])
                 + EPILOGUE_ALU["targets"] * bool(args["HAS_TARGETS"]) + EPILOGUE_ALU["cap"] * bool(args["HAS_CAP"])
                 + EPILOGUE_ALU["topk"] * bool(args["TOPK"]))
    alu = logits * per_logit
    if args["TOPK"]:
        alu += row_blocks * segments * topk_merge_instructions(bn, bv, args["K_PAD"], tiles_per_segment)
    sfu = logits * (EPILOGUE_SFU["row_stats"] + EPILOGUE_SFU["cap"] * bool(args["HAS_CAP"]))

    cache = L2(chip.l2_bytes)
    slots = chip.sms * chip.ctas_per_sm
    programs = [(rb, seg) for seg in range(segments) for rb in range(row_blocks)]  # x fastest
    for start in range(0, len(programs), slots):
        wave = programs[start:start + slots]
        for step in range(tiles_per_segment):
            for rb, seg in wave:
                tile = seg * tiles_per_segment + step
                if tile < num_tiles:
                    cache.touch(("x", rb), hidden_tile)
                    cache.touch(("w", tile), weight_tile)
    keys = n * segments * args["K_PAD"] * 8 if args["TOPK"] else 0
    partials = segments * n * _partial_bytes_per_row(args) + keys
    return Work(launch.kernel, "fused", launch.phase, gemm_flops=2 * tiles * bn * bv * depth,
                gemm_dtype=_dot_dtype(hidden), hbm_read=cache.read, hbm_write=partials,
                l2_bytes=tiles * (hidden_tile + weight_tile), alu_ops=alu, sfu_ops=sfu,
                programs=row_blocks * segments,
                detail=f"grid {row_blocks}x{segments}, tiles {bn}x{bv}x{bh}, {tiles_per_segment} tiles/program"
                       + (f", running top-{args['K_PAD']}" if args["TOPK"] else ""))


def _partial_bytes_per_row(args) -> int:
    """Bytes per row and segment of the row-statistics partials (m, s, and t with the mean)."""
    return 4 * (2 + bool(args["WITH_MEAN"]))


def _dot_dtype(operand: TensorArg) -> str:
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(operand.dtype, "tf32")


def _owned_sweep(launch: TritonLaunch, chip: Chip, sides, per_logit_alu: float, per_logit_sfu: float,
                 extra_alu: float = 0.0) -> Work:
    """A backward sweep (``head_backward``/``jsd_backward`` with OWN_ROWS set or not): each of the
    grid's persistent programs owns blocks of gradient rows pid, pid + programs, ... and sweeps the
    other axis of its segment, recomputing the logits tiles of every side in ``sides`` — (hidden
    arg, weight arg, padded depth), the student first — and, per CHUNK swept entries, adding
    buffer @ operand into its gradient rows (one read and one write of them per chunk)."""
    args = launch.args
    n, v, h = args["N"], args["V"], args["H"]
    bn, bv, chunk, block_k = args["BLOCK_N"], args["BLOCK_V"], args["CHUNK"], args["BLOCK_K"]
    own_rows, need_out = bool(args["OWN_ROWS"]), bool(args["NEED_OUT"])
    programs, segments = launch.grid[0], launch.grid[1]
    own_len, sweep_len, b_own, b_sweep = (n, v, bn, bv) if own_rows else (v, n, bv, bn)
    owned_blocks, sweep_tiles = cdiv(own_len, b_own), cdiv(sweep_len, b_sweep)
    segment_tiles = args["TILES_PER_SEG"]
    x, w = args["x_ptr"], args["w_ptr"]
    operand = w if own_rows else x  # the rows a chunk's entries index
    tiles = owned_blocks * sweep_tiles
    logits = tiles * bn * bv
    flops = 2 * logits * sum(depth for _, _, depth in sides)
    l2 = tiles * sum((bn * depth * hid.itemsize + bv * depth * wt.itemsize) for hid, wt, depth in sides)
    if need_out:
        flops += 2 * owned_blocks * b_own * sweep_tiles * b_sweep * pad(h, block_k)
        l2 += tiles * bn * bv * operand.itemsize * (1 + cdiv(h, block_k))  # buffer writes and re-reads
    cache = L2(chip.l2_bytes)
    rounds = cdiv(owned_blocks, programs)
    gradient_bytes = b_own * h * 4
    for segment in range(segments):
        first = segment * segment_tiles
        seg_tiles = list(range(first, min(first + segment_tiles, sweep_tiles)))
        for round_ in range(rounds):
            blocks = [b for b in range(round_ * programs, min((round_ + 1) * programs, owned_blocks))]
            for start in range(0, len(seg_tiles), max(1, chunk // b_sweep)):
                chunk_tiles = seg_tiles[start:start + max(1, chunk // b_sweep)]
                for tile in chunk_tiles:
                    for side, (hid, wt, depth) in enumerate(sides):
                        swept, owned = (wt, hid) if own_rows else (hid, wt)
                        cache.touch(("sweep", side, tile), b_sweep * depth * swept.itemsize)
                        for block in blocks:
                            cache.touch(("own", side, block), b_own * depth * owned.itemsize)
                if need_out:
                    cache.touch(("rows", chunk_tiles[0]), len(chunk_tiles) * b_sweep * h * operand.itemsize)
                    for block in blocks:
                        cache.touch(("grad", segment, block), gradient_bytes, dirty=True)
                        l2 += 2 * gradient_bytes
    cache.flush()
    alu = logits * per_logit_alu + extra_alu
    what = "∂hidden rows" if own_rows else ("∂weight rows" if need_out else "∂bias")
    return Work(launch.kernel, "fused", launch.phase, gemm_flops=flops, gemm_dtype=_dot_dtype(x),
                hbm_read=cache.read, hbm_write=cache.written + (segments > 1) * segments * own_len * h * 4,
                l2_bytes=l2, alu_ops=alu, sfu_ops=logits * per_logit_sfu, programs=programs * segments,
                detail=f"grid {programs}x{segments} owning {what} ({owned_blocks} blocks of {b_own}), "
                       f"{tiles} tiles of {bn}x{bv}x{args['BLOCK_H']}, chunk {chunk}, no atomics")


def _head_backward(launch: TritonLaunch, chip: Chip) -> Work:
    args = launch.args
    h, bn, bv = args["H"], args["BLOCK_N"], args["BLOCK_V"]
    sides = [(args["x_ptr"], args["w_ptr"], pad(h, args["BLOCK_H"]))]
    tiles = cdiv(args["N"], bn) * cdiv(args["V"], bv)
    search = tiles * bn * 2 * args["search_steps"] * 12 if args["HAS_SPARSE"] else 0  # id + coefficient reads
    per_logit = EPILOGUE_ALU["head_backward"] + EPILOGUE_ALU["cap"] * bool(args["HAS_CAP"])
    sfu = EPILOGUE_SFU["head_backward"] + EPILOGUE_SFU["cap"] * bool(args["HAS_CAP"])
    return _owned_sweep(launch, chip, sides, per_logit, sfu, search)


def _jsd_sides(args):
    h, th, bh = args["H"], args["TH"], args["BLOCK_H"]
    sides = [(args["x_ptr"], args["w_ptr"], pad(h, bh))]
    teacher_weight = args["w_ptr"] if args["SHARED_WEIGHT"] else args["tw_ptr"]
    return sides + [(args["tx_ptr"], teacher_weight, pad(th, bh))]


def _jsd_backward(launch: TritonLaunch, chip: Chip) -> Work:
    args = launch.args
    per_logit = EPILOGUE_ALU["jsd_backward"] + EPILOGUE_ALU["cap"] * (bool(args["HAS_CAP"]) + bool(args["T_HAS_CAP"]))
    return _owned_sweep(launch, chip, _jsd_sides(args), per_logit, EPILOGUE_SFU["jsd"])


def _jsd_forward(launch: TritonLaunch, chip: Chip) -> Work:
    """Row blocks × vocabulary segments, as ``_row_stats``, with both sides' tiles; per-row partial sums."""
    args = launch.args
    n, v = args["N"], args["V"]
    bn, bv, bh = args["BLOCK_N"], args["BLOCK_V"], args["BLOCK_H"]
    row_blocks, segments = launch.grid[0], launch.grid[1]
    tiles_per_segment = args["TILES_PER_SEG"]
    num_tiles = cdiv(v, bv)
    sides = _jsd_sides(args)
    tiles = row_blocks * num_tiles
    logits = tiles * bn * bv
    cache = L2(chip.l2_bytes)
    slots = chip.sms * chip.ctas_per_sm
    programs = [(rb, seg) for seg in range(segments) for rb in range(row_blocks)]
    for start in range(0, len(programs), slots):
        wave = programs[start:start + slots]
        for step in range(tiles_per_segment):
            for rb, seg in wave:
                tile = seg * tiles_per_segment + step
                if tile < num_tiles:
                    for side, (hid, wt, depth) in enumerate(sides):
                        cache.touch(("x", side, rb), bn * depth * hid.itemsize)
                        cache.touch(("w", side, tile), bv * depth * wt.itemsize)
    per_logit = EPILOGUE_ALU["jsd_forward"] + EPILOGUE_ALU["cap"] * (bool(args["HAS_CAP"]) + bool(args["T_HAS_CAP"]))
    return Work(launch.kernel, "fused", launch.phase, gemm_flops=2 * logits * sum(d for _, _, d in sides),
                gemm_dtype=_dot_dtype(args["x_ptr"]), hbm_read=cache.read, hbm_write=segments * n * 8,
                l2_bytes=tiles * sum(bn * d * hid.itemsize + bv * d * wt.itemsize for hid, wt, d in sides),
                alu_ops=logits * per_logit, sfu_ops=logits * EPILOGUE_SFU["jsd"], programs=row_blocks * segments,
                detail=f"grid {row_blocks}x{segments}, tiles {bn}x{bv}x{bh}, {tiles_per_segment} tiles/program, "
                       "both sides")


_FUSED = {
    "_row_stats_kernel": _row_stats,
    "_head_backward_kernel": _head_backward,
    "_jsd_forward_kernel": _jsd_forward,
    "_jsd_backward_kernel": _jsd_backward,
}


# ----------------------------------------------------------------------------- any other kernel: its loads and stores

_TL_ACCESS = {"load": "load", "store": "store"}


def _is_tl_call(node, attr: str) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "tl")


def _jit_source(jit) -> str:
    return textwrap.dedent(inspect.getsource(jit.fn))


def _has_dot(jit, seen=None) -> bool:
    """Whether the kernel or a @triton.jit helper it calls uses ``tl.dot``."""
    seen = seen if seen is not None else set()
    if id(jit) in seen:
        return False
    seen.add(id(jit))
    source = _jit_source(jit)
    if "tl.dot(" in source:
        return True
    names = {node.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Name)}
    for name in names:
        helper = jit.fn.__globals__.get(name)
        if helper is not None and hasattr(helper, "fn") and hasattr(helper, "arg_names") and _has_dot(helper, seen):
            return True
    return False


def _evaluate(test, known):
    try:
        return bool(eval(compile(ast.Expression(test), "<test>", "eval"), {}, dict(known)))  # noqa: S307
    except Exception:  # noqa: BLE001 - a runtime condition: both branches may run
        return None


def pointer_accesses(jit, known: dict) -> dict:
    """{pointer argument: {"load"|"store"|"atomic": number of loops that access it}}.

    ``known``: the launch's non-tensor arguments (constexprs resolve their branches)."""
    function = ast.parse(_jit_source(jit)).body[0]
    params = [arg.arg for arg in function.args.args]
    derived = {p: {p} for p in params}
    sites = defaultdict(lambda: defaultdict(set))  # param -> kind -> {loop ids}

    def roots(expr):
        """The pointer arguments an expression's value may point into. A loaded value is data, not an
        address, and so is a pointer's dtype: an index read from memory (``ptr + tl.load(ids_ptr)``), or a
        slot computed from loaded values or in a pointer's element type (``scratch + cumsum(keys > t)``,
        ``x.to(a_ptr.dtype.element_ty)``), adds no root of its own."""
        found = set()
        pending = [expr]
        while pending:
            node = pending.pop()
            if _is_tl_call(node, "load") or (isinstance(node, ast.Attribute) and node.attr == "dtype"):
                continue
            if isinstance(node, ast.Name) and node.id in derived:
                found |= derived[node.id]
            pending.extend(ast.iter_child_nodes(node))
        return found

    def visit_expr(expr, loop):
        for node in ast.walk(expr):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(
                    node.func.value, ast.Name) and node.func.value.id == "tl":
                attr = node.func.attr
                kind = "atomic" if attr.startswith("atomic_") else _TL_ACCESS.get(attr)
                if kind and node.args:
                    for param in roots(node.args[0]):
                        sites[param][kind].add(loop)

    def visit(statements, loop):
        for statement in statements:
            if isinstance(statement, ast.If):
                taken = _evaluate(statement.test, known)
                early_exit = statement.body and isinstance(statement.body[-1], ast.Return)
                if taken is None and early_exit:
                    taken = False  # a masked-row early exit: the modelled rows are all live
                if taken in (None, True):
                    visit(statement.body, loop)
                if taken in (None, False):
                    visit(statement.orelse, loop)
                continue
            if isinstance(statement, (ast.For, ast.While)):
                visit(statement.body, id(statement))
                continue
            if isinstance(statement, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                value = statement.value
                if value is not None:
                    visit_expr(value, loop)
                    found = roots(value)
                    targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
                    for target in targets:
                        for node in ast.walk(target):
                            if isinstance(node, ast.Name):
                                keep = derived.get(node.id, set()) if isinstance(statement, ast.AugAssign) else set()
                                derived[node.id] = found | keep
                continue
            for child in ast.iter_child_nodes(statement):
                if isinstance(child, ast.expr):
                    visit_expr(child, loop)

    visit(function.body, None)
    return {param: {kind: len(loops) for kind, loops in kinds.items()} for param, kinds in sites.items()}


def _streaming(launch: TritonLaunch) -> Work:
    known = {k: v for k, v in launch.args.items() if not isinstance(v, TensorArg)}
    accesses = pointer_accesses(launch.jit, known)
    read = written = atomics = atomic_bytes = 0
    for param, kinds in accesses.items():
        arg = launch.args.get(param)
        if not isinstance(arg, TensorArg):
            continue
        read += kinds.get("load", 0) * arg.distinct_bytes
        written += kinds.get("store", 0) * arg.distinct_bytes
        if kinds.get("atomic"):
            atomics += kinds["atomic"] * arg.distinct_bytes // arg.itemsize
            atomic_bytes += kinds["atomic"] * arg.distinct_bytes
    programs = math.prod(launch.grid)
    return Work(launch.kernel, "stream", launch.phase, hbm_read=read, hbm_write=written, atomics=atomics,
                atomic_bytes=atomic_bytes, programs=programs, detail=f"grid {'x'.join(map(str, launch.grid))}")


def launch_work(launch: TritonLaunch, chip: Chip = Chip()) -> Work:
    """The ``Work`` of one recorded Triton launch on ``chip``."""
    model = _FUSED.get(launch.kernel)
    if model is not None:
        return model(launch, chip)
    if _has_dot(launch.jit):
        raise UnmodelledKernel(
            f"Triton kernel {launch.kernel} uses tl.dot and has no tile model in bench/gpu_kernels._FUSED: "
            "write down its dots, tile loads, atomics and program order there")
    return _streaming(launch)
