"""The work of a recorded Triton launch: FLOPs, bytes, atomics, from its launch plan.

Two kinds of kernels:

- **ptd's fused tile kernels** (``_row_stats_kernel``, ``_head_backward_kernel``, ``_jsd_forward_kernel``,
  ``_jsd_backward_kernel``): each program owns BLOCK_N rows × BLOCK_V vocabulary columns and forms the
  logits tile with ``tl.dot`` over the hidden size in BLOCK_H steps. From the grid and the constexprs:
  dot FLOPs (padded tiles included: the tensor cores compute them), the tile loads from L2
  (hidden and weight tiles, re-read per tile), the atomics of the gradient kernels, an instruction
  count of the per-logit epilogue, and the HBM traffic from a simulated L2 (below).
- **every other Triton kernel** (peers' elementwise kernels, and any kernel without ``tl.dot``): the
  kernel's source says which pointer arguments it loads, stores and updates atomically; each is
  taken as moving its whole tensor once per loop that touches it (a row-per-program streaming
  kernel). Branches on constexprs are resolved with the launch's values; a runtime branch that
  ends in ``return`` (a masked-row early exit) is taken as not taken (the modelled data masks no row).

A fused kernel not modelled here raises ``UnmodelledKernel``: its tile plan has to be written down
(a few lines: see ``_FUSED``), not guessed.

**L2 assumption.** Programs run in waves of ``sms × ctas_per_sm`` consecutive program ids (one CTA per
SM for these kernels: 8–16 warps and 74–98 KiB of shared memory each), and the programs of a wave
advance together. The L2 is a least-recently-used cache of ``Chip.l2_bytes`` holding whole tiles:
hidden and weight tiles are read from HBM on a miss; a gradient accumulator tile is read on its first
touch, kept while it is reused, and written back when evicted (and at the end). Tiles touched by
several programs of one wave are fetched once.
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
# An int64 compare-and-swap of Triton's bitonic network (standard.py ``_compare_and_swap``): the partner's
# xor (2), the flip (2), the 64-bit compare (3), select (2), the orientation (2): ~12 int32 instructions
# per element and stage, on every element of the tile.
SWAP_INSTRUCTIONS = 12


def topk_merge_instructions(block_n: int, block_v: int, k_pad: int) -> float:
    """Instructions of one running top-K merge of a [block_n, block_v] key tile (``tl.topk`` then
    ``tl.bitonic_merge`` of K_PAD, as ``row_stats._merge_topk_bitonic``)."""
    log_n, log_k = int(math.log2(block_v)), int(math.log2(k_pad))
    element_stages = block_v * log_k * (log_k + 1) // 2  # bitonic sort of runs of k_pad
    width = block_v
    for _ in range(log_k + 1, log_n + 1):  # halve by max, re-merge
        width //= 2
        element_stages += width * (1 + log_k)
    element_stages += k_pad * log_k + k_pad  # bitonic_merge of the k_pad list and the elementwise max
    return block_n * element_stages * SWAP_INSTRUCTIONS


# ----------------------------------------------------------------------------- ptd's fused tile kernels


def _tile_program_order(num_n: int, num_v: int, group_n: int):
    """(row tile, vocabulary tile) of each program id, as ``tiles.tile_ids`` maps them."""
    per_group = group_n * num_v
    for pid in range(num_n * num_v):
        first_n = (pid // per_group) * group_n
        group_rows = min(num_n - first_n, group_n)
        yield first_n + (pid % per_group) % group_rows, (pid % per_group) // group_rows


def _grouped_sweep_hbm(chip: Chip, num_n, num_v, group_n, blocks) -> tuple[int, int]:
    """HBM (read, written) of a 1-D grouped tile sweep. ``blocks(n, v)`` → [(key, bytes, dirty)] one program touches."""
    cache = L2(chip.l2_bytes)
    slots = chip.sms * chip.ctas_per_sm
    wave: dict = {}
    for count, (tile_n, tile_v) in enumerate(_tile_program_order(num_n, num_v, group_n), 1):
        for key, nbytes, dirty in blocks(tile_n, tile_v):
            previous = wave.get(key)
            wave[key] = (nbytes, dirty or (previous is not None and previous[1]))
        if count % slots == 0:
            for key, (nbytes, dirty) in wave.items():
                cache.touch(key, nbytes, dirty)
            wave = {}
    for key, (nbytes, dirty) in wave.items():
        cache.touch(key, nbytes, dirty)
    cache.flush()
    return cache.read, cache.written


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
    if args["TOPK"]:  # every tile merges: with BLOCK_N rows, some row nearly always has a new candidate
        alu += tiles * topk_merge_instructions(bn, bv, args["K_PAD"])
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
                       + (f", top-{args['K_PAD']} merge" if args["TOPK"] else ""))


def _partial_bytes_per_row(args) -> int:
    """Bytes per row and segment of the row-statistics partials (m, s, and t with the mean)."""
    return 4 * (2 + bool(args["WITH_MEAN"]))


def _dot_dtype(operand: TensorArg) -> str:
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(operand.dtype, "tf32")


def _gradient_tiles(args, bn, bv, depth, h, n, v, num_n, num_v, x, w):
    """Dots, L2 bytes and atomic updates of ``accumulate_head_grads`` over the whole grid (the atomics
    are masked to the valid rows, columns and hidden units)."""
    need_x, need_w, need_b = bool(args["NEED_X_GRAD"]), bool(args["NEED_W_GRAD"]), bool(args["NEED_B_GRAD"])
    tiles = num_n * num_v
    dots = need_x + need_w
    l2 = tiles * (need_x * bv * depth * w.itemsize + need_w * bn * depth * x.itemsize)
    atomics = need_x * num_v * n * h + need_w * num_n * v * h + need_b * num_n * v
    return dots, l2, atomics


def _gradient_blocks(args, bn, bv, depth, x, w):
    need_x, need_w = bool(args["NEED_X_GRAD"]), bool(args["NEED_W_GRAD"])

    def blocks(tile_n, tile_v):
        out = []
        if need_x:
            out.append((("gx", tile_n), bn * depth * 4, True))
        if need_w:
            out.append((("gw", tile_v), bv * depth * 4, True))
        return out

    return blocks


def _head_backward(launch: TritonLaunch, chip: Chip) -> Work:
    args = launch.args
    n, v, h = args["N"], args["V"], args["H"]
    bn, bv, bh, group = args["BLOCK_N"], args["BLOCK_V"], args["BLOCK_H"], args["GROUP_N"]
    num_n, num_v = cdiv(n, bn), cdiv(v, bv)
    x, w = args["x_ptr"], args["w_ptr"]
    depth = pad(h, bh)
    tiles = num_n * num_v
    grad_dots, grad_l2, atomics = _gradient_tiles(args, bn, bv, depth, h, n, v, num_n, num_v, x, w)
    search = tiles * bn * 2 * args["search_steps"] * 12 if args["HAS_SPARSE"] else 0  # id + coefficient reads
    logits = tiles * bn * bv
    per_logit = EPILOGUE_ALU["head_backward"] + EPILOGUE_ALU["cap"] * bool(args["HAS_CAP"])
    gradient_blocks = _gradient_blocks(args, bn, bv, depth, x, w)

    def blocks(tile_n, tile_v):
        return [(("x", tile_n), bn * depth * x.itemsize, False), (("w", tile_v), bv * depth * w.itemsize, False),
                *gradient_blocks(tile_n, tile_v)]

    read, written = _grouped_sweep_hbm(chip, num_n, num_v, group, blocks)
    return Work(launch.kernel, "fused", launch.phase, gemm_flops=2 * logits * depth * (1 + grad_dots),
                gemm_dtype=_dot_dtype(x), hbm_read=read, hbm_write=written,
                l2_bytes=tiles * (bn + bv) * depth * x.itemsize + grad_l2 + search,
                atomics=atomics, atomic_bytes=4 * atomics, alu_ops=logits * per_logit,
                sfu_ops=logits * (EPILOGUE_SFU["head_backward"] + EPILOGUE_SFU["cap"] * bool(args["HAS_CAP"])),
                programs=tiles, detail=f"grid {tiles} ({num_n}x{num_v} tiles of {bn}x{bv}x{bh}), "
                                       f"{1 + grad_dots} dots/tile, fp32 atomics")


def _jsd(launch: TritonLaunch, chip: Chip) -> Work:
    args = launch.args
    backward = "NEED_X_GRAD" in args
    n, v, h, th = args["N"], args["V"], args["H"], args["TH"]
    bn, bv, bh, group = args["BLOCK_N"], args["BLOCK_V"], args["BLOCK_H"], args["GROUP_N"]
    num_n, num_v = cdiv(n, bn), cdiv(v, bv)
    x, w, tx, tw = args["x_ptr"], args["w_ptr"], args["tx_ptr"], args["tw_ptr"]
    shared = bool(args["SHARED_WEIGHT"])
    depth, teacher_depth = pad(h, bh), pad(th, bh)
    tiles = num_n * num_v
    logits = tiles * bn * bv
    flops = 2 * logits * (depth + teacher_depth)
    l2 = tiles * ((bn + bv) * depth * x.itemsize + bn * teacher_depth * tx.itemsize
                  + (0 if shared else bv * teacher_depth * tw.itemsize))
    atomics = 0 if backward else 2 * n * num_v
    grad_blocks = None
    if backward:
        grad_dots, grad_l2, atomics = _gradient_tiles(args, bn, bv, depth, h, n, v, num_n, num_v, x, w)
        flops += 2 * logits * depth * grad_dots
        l2 += grad_l2
        grad_blocks = _gradient_blocks(args, bn, bv, depth, x, w)

    def blocks(tile_n, tile_v):
        out = [(("x", tile_n), bn * depth * x.itemsize, False), (("w", tile_v), bv * depth * w.itemsize, False),
               (("tx", tile_n), bn * teacher_depth * tx.itemsize, False)]
        if not shared:
            out.append((("tw", tile_v), bv * teacher_depth * tw.itemsize, False))
        if grad_blocks is not None:
            out.extend(grad_blocks(tile_n, tile_v))
        return out

    read, written = _grouped_sweep_hbm(chip, num_n, num_v, group, blocks)
    per_logit = EPILOGUE_ALU["jsd_backward" if backward else "jsd_forward"] + EPILOGUE_ALU["cap"] * (
        bool(args["HAS_CAP"]) + bool(args["T_HAS_CAP"]))
    return Work(launch.kernel, "fused", launch.phase, gemm_flops=flops, gemm_dtype=_dot_dtype(x),
                hbm_read=read, hbm_write=written, l2_bytes=l2, atomics=atomics, atomic_bytes=4 * atomics,
                alu_ops=logits * per_logit, sfu_ops=logits * EPILOGUE_SFU["jsd"], programs=tiles,
                detail=f"grid {tiles} ({num_n}x{num_v} tiles of {bn}x{bv}x{bh}), "
                       f"{flops / (2 * logits * depth):.0f} dots/tile" + (", fp32 atomics" if backward else ""))


_FUSED = {
    "_row_stats_kernel": _row_stats,
    "_head_backward_kernel": _head_backward,
    "_jsd_forward_kernel": _jsd,
    "_jsd_backward_kernel": _jsd,
}


# ----------------------------------------------------------------------------- any other kernel: its loads and stores

_TL_ACCESS = {"load": "load", "store": "store"}


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
        found = set()
        for node in ast.walk(expr):
            if isinstance(node, ast.Name) and node.id in derived:
                found |= derived[node.id]
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
