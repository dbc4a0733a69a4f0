"""Public knobs: the memory budgets of the chunked PyTorch backend and of the cuBLAS backend, and host
synchronizations.

Logits exist only as blocks of these sizes; they are constants (nothing grows with N·V). Each is
read when a function is called, so setting one takes effect on the next call::

    import ptd_kernels
    ptd_kernels.config.LOSS_BLOCK_BYTES = 32 << 20   # trade CPU speed for memory in the loss functions

Two block levels, because a CPU has two speeds: a block is as large as its budget allows, so that
its GEMMs run at full speed (a thin block re-streams the whole weight per call); the elementwise
math then walks it in sub-blocks of ``SUB_BLOCK_BYTES`` per buffer, which stay in the core's cache.
The Triton backend tiles in registers and ignores these budgets; the cuBLAS backend
(``backend="cublas"``) reads only ``CUDA_BLOCK_BYTES``.
"""

#: One-sided logits block: the per-row forward and backward sweeps, and the logits-level functions.
CHUNK_BYTES = 32 << 20
#: Both sides' full-row logits blocks of the per-row full-JSD forward.
FUSED_BLOCK_BYTES = 48 << 20
#: Both sides' full-row blocks of the one-sweep loss (``linear_jsd_loss``, ``linear_topk_jsd_loss``).
#: A GEMM with few rows re-streams the whole weight: on 2 threads at V = 32000, H = 1024 the loss's
#: four GEMMs took 3.63 s in 196-row blocks, 3.25 s in 256-row and 3.03 s in 342-row (88 MiB) blocks,
#: against 3.00 s unblocked.
LOSS_BLOCK_BYTES = 88 << 20
#: Elementwise sub-blocks, per buffer (a few of them stay in a 1–2 MiB L2).
SUB_BLOCK_BYTES = 1 << 20
#: All live [rows, M, H] temporaries of one chunk of a gather at M ids per row (support logits).
GATHER_BYTES = 16 << 20
#: Rows per forward block of the row statistics: each weight block is read once per row block.
ROW_BLOCK = 1024
#: Below this many rows per two-sided block, the one-sweep loss re-reads the weights more often
#: than recomputing in backward costs, and the loss functions take the per-row path instead.
FUSED_LOSS_MIN_ROWS = 128

#: The cuBLAS backend's working memory per sweep: its float32 logits block(s) (the output of one cuBLAS
#: GEMM, then worked on in place by the elementwise kernels) and their top-K scratch. The one knob that
#: trades speed for memory there: larger blocks mean larger GEMMs and, where a block must hold whole
#: vocabulary rows (the one-sweep loss, the per-row full JSD), fewer read-modify-writes of the float32
#: d weight. At the default, a sweep at N = 8192, V = 151936, H = 4096, K = 100 holds ≤ 1 GiB of working
#: memory in all (this block, plus O(N·K) row state); see docs/cublas.md.
CUDA_BLOCK_BYTES = 896 << 20

#: Host synchronizations. By default a call reads a few device values once (one transfer): the live-row
#: counts, so that masked rows are left out of every sweep, and the id ranges, so that a target or a sparse
#: teacher id outside [0, V) is a clear error. With ``SYNC_FREE = True`` no call reads the device (nothing
#: waits for queued GPU work): ids are not checked (an id outside [0, V) gives an undefined value in its row,
#: or a failed gather, instead of a clear error), and masked rows are computed with their hidden states
#: replaced by zeros, then zeroed (a copy of the hidden states when some row may be masked). A
#: vocabulary-parallel call still reads its one exchange (the ranks' slice sizes and agreement).
#: docs/host_syncs.md counts the synchronizations of every function on both paths.
SYNC_FREE = False

#: Check a callable ``row_loss`` of ``linear_policy_loss`` for row-separability on every device (a host read
#: per block), including the full Jacobian structure of the first rows of each block. Off, the check runs on
#: CPU tensors only (where reading costs nothing) and looks at the rows outside each block.
CHECK_ROW_LOSS = False
