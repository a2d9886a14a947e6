"""GPU backend of the recurrent LM runtime: a state pool, fused kernels and CUDA-graph decode.

Same ``Runtime`` protocol and ``MambaState`` layout as ``duplex/runtime.py`` (whose pure-torch math is
the reference this backend is tested against), faster inside:

* **State pool.** Every state made by ``new_state``/``fork`` is a row range of one contiguous
  ``MambaState`` per runtime (conv in the model dtype, SSM in fp32), so a fork or a rollback is one
  ``copy_`` per kind and a decode step can address any set of branches by row index.
* **Fused kernels.** Per decode layer: RMSNorm inside in_proj, conv + SiLU + x_proj (state in place),
  dt_proj + selective scan (state in place, softplus, D skip, SiLU gate), out_proj adding into the fp32
  residual: 4 launches instead of ~40 (``duplex/cuda_kernels.py``), chained by programmatic dependent
  launch so each loads its weights while the previous one runs; one or two rows (main + auxiliary
  branch). Prefill chunks and larger batches run norm, in_proj, conv, x_proj, dt_proj, scan and
  out_proj separately, each linear layer on cuBLAS or our skinny tensor-core GEMM (up to 64 rows) as
  measured per layer and tile height when the runtime is built. With mamba-ssm installed its Triton
  ``selective_state_update`` can do the single-token scan (``kernels="mamba_ssm"``, ``decode="split"``).
* **CUDA graphs.** One graph per (batch bucket, chunk length), captured on first use over the whole
  pool with a static row-index buffer, so any branches of any sessions replay the same graph.
  Chunks longer than ``graph_max_len`` run eagerly in pieces of ``prefill_chunk`` tokens (constant
  memory whatever the context length).

States that are not pool rows (e.g. made by ``MambaState.clone``) still work, eagerly.
Without a GPU (or with ``kernels="torch"``) every call runs the reference math of ``TorchMambaRuntime``.
"""
from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from duplex import cuda_kernels
from duplex.runtime import TorchMambaRuntime, check_many
from duplex.state import MambaState

logger = logging.getLogger(__name__)

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# prefill_many pads its chunks (padding is free: each row ends at its own length) to one of these lengths
# when graphs are used, so chunks of any mix of lengths replay a few graphs
LENGTH_BUCKETS = (8, 16, 24, 32, 48, 64)
# Tile heights of the skinny GEMM (cuda_kernels.skinny_linear): its use is measured per layer and height.
ROW_CLASSES = (16, 32, 64)
LINEAR_LAYERS = ("in_proj", "x_proj", "dt_proj", "out_proj", "lm_head")
ADDING_LAYERS = ("x_proj", "out_proj")  # skinny: added (split-K atomics) into an fp32 buffer
# Up to this many rows, dt_proj runs inside the scan kernel and x_proj inside the conv kernel (decode),
# per row; beyond, those kernels would serialise over rows or re-read weights per row (dt_proj at 64
# rows: 6.7 GB per step), so x_proj is a GEMM and dt_proj runs in a scan over blocks of rows with
# tl.dot (cuda_kernels.ROWS_DECODE_TILES), reading its weights once per block.
FUSED_DT_MAX_BATCH = 2
# The "fused" decode path (see select_decode_path) runs up to this many rows: a two-row step takes
# 2.69 ms there against 3.14 on the split path (H100, run Q; docs/performance.md); more rows run "split".
FUSED_DECODE_MAX_BATCH = 2


def scan_block(batch: int, length: int) -> int:
    """Channels per program of the scan kernel: 16 for chunks of one or two rows, so the 5120 channels of
    one row make 320 programs that all run at once on an H100 (32 gave 160, 1.2 waves: a 21-token chunk
    took 25 us per layer, 11 with 16); 16 for long chunks (register pressure); else 32 (a decode step
    was no faster with 16)."""
    return 16 if (length > 1 and batch <= 2) or length > 64 else 32


def conv_block(batch: int) -> int:
    """Channels per program of the chunk conv kernel: enough programs for a few rows (a 21-token chunk
    of one row with 256 channels per program ran 20 programs: 8.4 us per layer)."""
    return 32 if batch <= 8 else 256


def select_lm_kernels(requested: str, device: torch.device) -> str:
    """Pick "mamba_ssm", "triton" or "torch" for ``device`` and log why ("auto": ours on CUDA)."""
    if requested not in ("auto", "mamba_ssm", "triton", "torch"):
        raise ValueError(f"CudaMambaRuntime: kernels={requested!r}; use auto, mamba_ssm, triton or torch.")
    if requested == "auto":
        if device.type != "cuda":
            logger.info("LM kernels: torch (device %s is not CUDA)", device)
            return "torch"
        # Ours: the "fused" decode path (see select_decode_path) beat mamba-ssm's single-token scan on an
        # H100 (docs/performance.md); kernels="mamba_ssm" still selects it.
        requested = "triton"
        logger.info("LM kernels: triton (ours; mamba-ssm %s, kernels='mamba_ssm' to use its scan)",
                    "found" if _mamba_ssm_state_update() is not None else "not installed")
    if requested == "mamba_ssm" and _mamba_ssm_state_update() is None:
        raise ImportError("CudaMambaRuntime: kernels='mamba_ssm' but mamba_ssm does not import; install it "
                          "(../shared/tools/build_mamba_kernels.sh) or use kernels='triton'.")
    return requested


def select_decode_path(requested: str, kernels: str) -> str:
    """How a decode step of at most FUSED_DECODE_MAX_BATCH rows runs with fused kernels (``kernels`` not torch):

    * "fused": 4 launches per layer: RMSNorm inside in_proj (our GEMV), conv + SiLU + x_proj, dt_proj +
      scan + gate, out_proj added into the fp32 residual; each loads its weights before waiting for the
      previous kernel (programmatic dependent launch, sm_90+), so weight streaming overlaps the small
      latency-bound kernels.
    * "split": RMSNorm, in_proj and out_proj as measured per shape (cuBLAS or ours), 5 launches per layer;
      the only path that can use mamba-ssm's ``selective_state_update``.

    "auto" is "split" with kernels="mamba_ssm" (which asks for its scan) and "fused" otherwise.
    """
    if requested not in ("auto", "fused", "split"):
        raise ValueError(f"CudaMambaRuntime: decode={requested!r}; use auto, fused or split.")
    if requested == "auto":
        return "split" if kernels == "mamba_ssm" else "fused"
    if requested == "fused" and kernels == "mamba_ssm":
        raise ValueError("CudaMambaRuntime: decode='fused' runs our scan kernel; kernels='mamba_ssm' needs "
                         "decode='split'.")
    return requested


def _mamba_ssm_state_update():
    """mamba-ssm's Triton single-token scan, or None when the package is missing or broken."""
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except Exception:  # ImportError, or a CUDA extension built for another torch
        return None
    return selective_state_update


@dataclass
class _LayerWeights:
    """Views of one block's parameters in the layout the kernels read (no copies but A = -exp(A_log))."""
    norm: torch.Tensor      # (H,)
    in_proj: torch.Tensor   # (2D, H)
    conv_w: torch.Tensor    # (D, K)
    conv_b: torch.Tensor | None
    x_proj: torch.Tensor    # (R + 2N, D)
    dt_proj: torch.Tensor   # (D, R)
    dt_bias: torch.Tensor   # (D,)
    A: torch.Tensor         # (D, N) fp32
    D: torch.Tensor         # (D,)
    out_proj: torch.Tensor  # (H, D)


@dataclass
class _Graph:
    """A captured run over the pool: static inputs (index buffers, embeds) and output (logits).

    ``index`` holds (bucket,) int64 buffers: "rows" (the state rows read), and for a forking run also
    "new_rows" (where the final state goes), "snap_pos" (per row, the position whose state goes back to
    "rows"; 0 = none), "logit_pos" (per row, the position whose logits are returned) and "end_pos" (per row,
    its real length: the final state is the one after it, the positions beyond are padding)."""
    graph: torch.cuda.CUDAGraph
    index: dict             # name -> (bucket,) int64 device buffer
    embeds: torch.Tensor    # (bucket, L, H)
    logits: torch.Tensor    # (bucket, V) fp32
    last: dict = field(default_factory=dict)  # name -> the values currently in that buffer (host copy)


class CudaMambaRuntime(TorchMambaRuntime):
    """Recurrent Mamba LM runtime for CUDA over a pool of ``max_rows`` state rows.

    Parameters
    ----------
    hf_model : transformers.MambaForCausalLM
        Weights are read in place (bf16 weights + fp32 SSM state is the intended setup).
    max_rows : int
        Branch rows in the pool (all sessions together); one more scratch row pads graph buckets.
    kernels : str
        "auto" (our Triton kernels on CUDA, torch elsewhere), "triton", "mamba_ssm" (its single-token
        scan on the split path) or "torch".
    use_graphs : bool, optional
        Capture CUDA graphs (default: on CUDA with fused kernels).
    prefill_chunk, graph_max_len : int
        Eager prefill piece length; longest chunk replayed from a graph.
    linear : str
        "auto" (per layer and tile height, our skinny GEMM where timed faster than cuBLAS), "skinny" or
        "cublas": the linear layers of chunks and of decode steps on the split path.
    decode : str
        "auto", "fused" or "split" (see ``select_decode_path``).
    pdl : bool, optional
        Programmatic dependent launch on the fused path (default: on sm_90+).
    fused_max_rows : int
        Decode steps of up to this many rows take the fused path (default 2: main + auxiliary branch).
    split_pdl : bool or str
        PDL on the split path: False (default), "late" or True/"early" (see ``cuda_kernels._pdl_args``).
    fused_tiles : dict, optional
        ``{rows: {"in_proj" | "conv" | "out_proj": kernel options}}`` replacing entries of
        ``cuda_kernels.FUSED_DECODE_TILES`` (for benchmarks).
    split_tiles : dict, optional
        ``{"scan": kernel options}`` replacing those of ``cuda_kernels.ROWS_DECODE_TILES`` (the split
        path's decode scan with dt_proj for more than ``FUSED_DT_MAX_BATCH`` rows); ``{"scan": False}``:
        a dt_proj GEMM and the chunks' scan instead (for benchmarks).

    Example
    -------
    >>> from transformers import MambaConfig, MambaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> lm = MambaForCausalLM(MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
    ...                                   state_size=4, expand=2, conv_kernel=4)).eval()
    >>> rt = CudaMambaRuntime(lm, max_rows=4)   # on CPU: reference math, pool semantics
    >>> main = rt.new_state(); _ = rt.prefill(main, rt.embed(torch.tensor([[1, 2, 3]])))
    >>> aux = rt.fork(main); _ = rt.step(aux, rt.embed(torch.tensor([[4]])))
    >>> main.seqlen, aux.seqlen, rt.free_rows
    ([3], [4], 2)
    """

    def __init__(self, hf_model, max_rows: int = 8, kernels: str = "auto", use_graphs: bool | None = None,
                 prefill_chunk: int = 1024, graph_max_len: int = 64, linear: str = "auto", decode: str = "auto",
                 pdl: bool | None = None, fused_max_rows: int = FUSED_DECODE_MAX_BATCH,
                 split_pdl: bool | str = False, fused_tiles: dict | None = None, split_tiles: dict | None = None):
        super().__init__(hf_model)
        self.kernels = select_lm_kernels(kernels, self.device)
        self.decode = select_decode_path(decode, self.kernels)
        self.fused_max_rows = int(fused_max_rows)
        if not 1 <= self.fused_max_rows <= cuda_kernels.GEMV_MAX_ROWS:
            raise ValueError(f"CudaMambaRuntime: fused_max_rows={fused_max_rows}; the fused decode path takes "
                             f"1 to {cuda_kernels.GEMV_MAX_ROWS} rows.")
        # programmatic dependent launch: Hopper and newer (sm_90+), CUDA only
        self.pdl = (self.device.type == "cuda" and torch.cuda.get_device_capability(self.device)[0] >= 9) \
            if pdl is None else bool(pdl)
        # the split path (chunks, larger batches): PDL with the early trigger made it slower on an H100
        # (batch 64: 5.30 against 5.03 ms; docs/performance.md); "late" (each kernel lets the next launch
        # only as its programs exit) was within noise of no PDL, so none by default
        if split_pdl not in (False, True, "early", "late"):
            raise ValueError(f"CudaMambaRuntime: split_pdl={split_pdl!r}; use False, True/'early' or 'late'.")
        self.split_pdl = split_pdl if self.pdl else False
        self.use_graphs = (self.device.type == "cuda" and self.kernels != "torch") if use_graphs is None \
            else bool(use_graphs)
        if self.use_graphs and (self.device.type != "cuda" or self.kernels == "torch"):
            raise ValueError("CudaMambaRuntime: CUDA graphs need a CUDA model and fused kernels "
                             f"(device {self.device}, kernels {self.kernels}).")
        if self.kernels != "torch" and self.d_conv != 4:
            raise ValueError(f"CudaMambaRuntime: fused kernels support conv width 4 only (config has "
                             f"{self.d_conv}); use kernels='torch'.")
        self.prefill_chunk, self.graph_max_len = int(prefill_chunk), int(graph_max_len)
        self.max_rows = int(max_rows)
        self.pool = MambaState.zeros(len(self.backbone.layers), self.max_rows + 1, self.d_inner, self.d_conv,
                                     self.d_state, dtype=self.dtype, device=self.device)
        self.scratch_row = self.max_rows
        self._used = [False] * self.max_rows
        self._free_heap = list(range(self.max_rows))  # free single rows, smallest first (stale entries skipped)
        self._free_count = self.max_rows
        self._row_views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (start, size) -> views
        self._layers = [self._layer_weights(block) for block in self.backbone.layers]
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._state_update = _mamba_ssm_state_update() if self.kernels == "mamba_ssm" else None
        self.skinny_plan = self._plan_linears(linear)  # {(layer name, tile height): our skinny kernel?}
        # the fused decode path's kernel options per row count (fused_tiles: {rows: {kernel: options}}
        # replacing cuda_kernels.FUSED_DECODE_TILES entries, for benchmarks)
        self._fused_options = {rows: cuda_kernels.fused_decode_options(rows, self.device, fused_tiles)
                               for rows in range(1, self.fused_max_rows + 1)}
        split_tiles = split_tiles or {}
        self._rows_scan = split_tiles.get("scan") is not False
        self._split_options = {kernel: {**options, **(split_tiles.get(kernel) or {})}
                               for kernel, options in cuda_kernels.ROWS_DECODE_TILES.items()}

    @property
    def linear_choice(self) -> dict[str, dict[int, str]]:
        """Which kernel does each linear layer per skinny tile height (rows up to 16, 32, 64; more rows:
        cuBLAS). "skinny" for out_proj / x_proj means added into the fp32 residual / accumulator."""
        return {name: {block_m: "skinny" if self.skinny_plan[(name, block_m)] else "cublas"
                       for block_m in ROW_CLASSES} for name in LINEAR_LAYERS}

    # ------------------------------------------------------------------ pool
    @property
    def free_rows(self) -> int:
        return self._free_count

    def new_state(self, batch_size: int = 1) -> MambaState:
        """Zero state of ``batch_size`` consecutive pool rows (release it with ``release``)."""
        return self._take_rows(batch_size).zero_()

    def fork(self, state: MambaState) -> MambaState:
        """A new branch with the content of ``state``: pool rows + one ``copy_`` per kind."""
        return self._take_rows(state.batch_size).copy_(state)

    def _take_rows(self, batch_size: int) -> MambaState:
        """Mark ``batch_size`` consecutive free rows used; a view of them (content left as it was).

        The tensor views of each row range are made once and reused: a fork is host-bound (two copy
        launches of ~15 us of device work), so it does no slicing."""
        start = self._find_free_row() if batch_size == 1 else self._find_free_run(batch_size)
        for i in range(start, start + batch_size):
            self._used[i] = True
        self._free_count -= batch_size
        views = self._row_views.get((start, batch_size))
        if views is None:
            rows = self.pool.rows(start, start + batch_size)
            views = self._row_views[(start, batch_size)] = (rows.conv, rows.ssm)
        return MambaState(*views, _counts=self.pool._counts, _rows=slice(start, start + batch_size))

    def _take_single_rows(self, wanted: list[bool]) -> list[MambaState | None]:
        """One free row per True (None per False); all or none (a full pool gives back what it took, then raises)."""
        taken = []
        try:
            for want in wanted:
                taken.append(self._take_rows(1) if want else None)
        except RuntimeError:
            self.release_many([state for state in taken if state is not None])
            raise
        return taken

    def release(self, state: MambaState) -> None:
        """Give a state's pool rows back (the state must not be used afterwards)."""
        rows = self._pool_rows(state)
        if rows is None:
            return
        for i in rows:
            if self._used[i]:
                self._used[i] = False
                self._free_count += 1
                heapq.heappush(self._free_heap, i)

    def _find_free_row(self) -> int:
        """The lowest free row, without a scan of the pool (a fork's host cost must not grow with the pool)."""
        while self._free_heap:
            row = heapq.heappop(self._free_heap)
            if not self._used[row]:  # an entry can be stale: the row went to a multi-row state meanwhile
                return row
        return self._find_free_run(1)  # raises the pool-exhausted error

    def _find_free_run(self, batch_size: int) -> int:
        run = 0
        for i, used in enumerate(self._used):
            run = 0 if used else run + 1
            if run == batch_size:
                return i - batch_size + 1
        raise RuntimeError(f"CudaMambaRuntime: no {batch_size} consecutive free rows in the state pool "
                           f"({self.free_rows} of {self.max_rows} free); release finished branches or "
                           "build the runtime with a larger max_rows.")

    def _pool_rows(self, state: MambaState) -> list[int] | None:
        """Pool row numbers of ``state``, or None when it owns its own buffers."""
        if state._counts is self.pool._counts:  # a view made by rows()/_take_rows: its rows are the pool's
            return list(range(state._rows.start, state._rows.stop))
        pool = self.pool.ssm
        if state.ssm.untyped_storage().data_ptr() != pool.untyped_storage().data_ptr() \
                or state.ssm.stride() != pool.stride():
            return None
        first = (state.ssm.storage_offset() - pool.storage_offset()) // pool.stride(1)
        return list(range(first, first + state.batch_size))

    # ------------------------------------------------------------------ protocol
    @torch.no_grad()
    def prefill(self, state: MambaState, embeds: torch.Tensor) -> torch.Tensor:
        """Feed a chunk (B, L, H) continuing from ``state`` (in place); logits (B, V) of the last position."""
        if self.kernels == "torch":
            return super().prefill(state, embeds)
        self._check_input(state, embeds)
        return self._forward([state], embeds)

    @torch.no_grad()
    def prefill_all_logits(self, state: MambaState, embeds: torch.Tensor) -> torch.Tensor:
        """As ``prefill`` but logits of every position (B, L, V); always eager."""
        if self.kernels == "torch":
            return super().prefill_all_logits(state, embeds)
        self._check_input(state, embeds)
        rows, conv, ssm = self._buffers([state])
        logits = self._run(conv, ssm, rows, embeds.to(self.dtype), all_logits=True)
        state.advance(embeds.shape[1])
        return logits

    @torch.no_grad()
    def prefill_and_fork(self, state: MambaState, embeds: torch.Tensor,
                         fork_at: int) -> tuple[MambaState, torch.Tensor]:
        """As the reference (``state`` takes ``embeds[:, :fork_at]``, a new branch all of it), in one pass
        over the weights: the chunk runs from ``state``'s rows, the conv and scan kernels write the state
        after ``fork_at`` positions back to those rows and the final state to the new branch's rows."""
        rows = self._pool_rows(state)
        length = embeds.shape[1] if embeds.dim() == 3 else 0
        if self.kernels == "torch" or rows is None or not 0 < fork_at < length or length > self.prefill_chunk:
            return super().prefill_and_fork(state, embeds, fork_at)
        self._check_input(state, embeds)
        fork = self._take_rows(state.batch_size)
        logits = self._forking_run(rows, self._pool_rows(fork), [fork_at] * len(rows), [length - 1] * len(rows),
                                   embeds, [length] * len(rows))
        fork.set_seqlen([n + length for n in state.seqlen])
        state.advance(fork_at)
        return fork, logits

    @torch.no_grad()
    def prefill_fork_and_step(self, state: MambaState, embeds: torch.Tensor, fork_at: int, other: MambaState,
                              other_embeds: torch.Tensor) -> tuple[MambaState, torch.Tensor, torch.Tensor]:
        """``prefill_and_fork(state, embeds, fork_at)`` and ``step(other, other_embeds)`` in one pass over the
        weights: ``other``'s token rides along as a second row padded to the chunk's length, its state taken
        after its first position (the padding's state goes to the scratch row). Returns (fork, fork's
        logits, other's logits). The duplex session: the listener's slice and the speaker's next token."""
        rows, other_rows = self._pool_rows(state), self._pool_rows(other)
        length = embeds.shape[1] if embeds.dim() == 3 else 0
        if self.kernels == "torch" or rows is None or other_rows is None or state.batch_size != 1 \
                or other.batch_size != 1 or not 0 < fork_at < length or length > self.prefill_chunk \
                or tuple(other_embeds.shape) != (1, 1, embeds.shape[-1]):
            return super().prefill_fork_and_step(state, embeds, fork_at, other, other_embeds)
        self._check_input(state, embeds)
        fork = self._take_rows(1)
        padded = torch.zeros_like(embeds)  # (1, L, H): the other row's token, then padding
        padded[:, :1] = other_embeds.to(padded)
        both = torch.cat([embeds, padded])  # (2, L, H)
        logits = self._forking_run(rows + other_rows, self._pool_rows(fork) + [self.scratch_row],
                                   [fork_at, 1], [length - 1, 0], both, [length, length])  # (2, V)
        fork.set_seqlen([state.seqlen[0] + length])
        state.advance(fork_at)
        other.advance(1)
        return fork, logits[:1], logits[1:]

    @torch.no_grad()
    def prefill_many(self, states: list[MambaState], chunks: list[torch.Tensor],
                     fork_at: list[int | None] | None = None) -> tuple[torch.Tensor, list[MambaState | None]]:
        """As the reference (``duplex.runtime.prefill_many_by_definition``), in one pass over the weights: the
        chunks right-padded to the longest, each row's final state taken at its own end (time step 0 on
        padding); a probe's row gets its state after ``fork_at`` positions back (snapshot) and its fork's new
        pool row the final one. Replayed from a CUDA graph per (rows bucket, length) when possible."""
        fork_at = check_many(states, chunks, fork_at)
        rows = [self._pool_rows(state) for state in states]
        length = max(chunk.shape[0] for chunk in chunks)
        if length == 1:  # one token each: a decode step
            return self.step_many(states, torch.stack(chunks)), [None] * len(states)  # (B, 1, H)
        if self.kernels == "torch" or any(r is None for r in rows) or length > self.prefill_chunk:
            return super().prefill_many(states, chunks, fork_at)
        forks = self._take_single_rows([at is not None for at in fork_at])
        rows = [r[0] for r in rows]
        lengths = [chunk.shape[0] for chunk in chunks]
        new_rows = [row if fork is None else self._pool_rows(fork)[0] for row, fork in zip(rows, forks)]
        embeds = torch.nn.utils.rnn.pad_sequence([c.to(self.device, self.dtype) for c in chunks],
                                                 batch_first=True)  # (B, L, H)
        if self.use_graphs:
            bucket = next((b for b in LENGTH_BUCKETS if b >= length), length)
            embeds = F.pad(embeds, (0, 0, 0, bucket - length))  # (B, bucket, H)
        logits = self._forking_run(rows, new_rows, [at or 0 for at in fork_at], [n - 1 for n in lengths], embeds,
                                   lengths)  # (B, V)
        for state, fork, at, n in zip(states, forks, fork_at, lengths):
            if fork is not None:
                fork.set_seqlen([state.seqlen[0] + n])
            state.advance(n if at is None else at)
        return logits, forks

    def fork_many(self, states: list[MambaState]) -> list[MambaState]:
        """A new branch per state: a free pool row each, copied from the states' rows in one gather per kind
        (pool rows), or one by one (states with their own buffers)."""
        sources = [self._pool_rows(state) for state in states]
        if any(r is None or len(r) != 1 for r in sources) or len(states) < 2:
            return [self.fork(state) for state in states]
        forks = self._take_single_rows([True] * len(states))
        src = torch.tensor([r[0] for r in sources], device=self.device)
        dst = torch.tensor([self._pool_rows(f)[0] for f in forks], device=self.device)
        self.pool.conv[:, dst] = self.pool.conv[:, src]
        self.pool.ssm[:, dst] = self.pool.ssm[:, src]
        for fork, state in zip(forks, states):
            fork.set_seqlen(state.seqlen)
        return forks

    def _forking_run(self, rows: list[int], new_rows: list[int], snap_pos: list[int], logit_pos: list[int],
                     embeds: torch.Tensor, end_pos: list[int]) -> torch.Tensor:
        """One pass of a chunk over ``rows``: per row, the state after ``snap_pos`` positions back to its row,
        the state after ``end_pos`` positions (its real length; padding beyond) to ``new_rows``, the logits of
        position ``logit_pos``; from a graph when possible."""
        embeds = embeds.to(device=self.device, dtype=self.dtype)
        index = {"rows": rows, "new_rows": new_rows, "snap_pos": snap_pos, "logit_pos": logit_pos,
                 "end_pos": end_pos}
        if self.use_graphs and embeds.shape[1] <= self.graph_max_len and len(rows) <= GRAPH_BUCKETS[-1]:
            return self._replay(index, embeds)
        index = {k: torch.tensor(v, device=self.device) for k, v in index.items()}
        return self._run(self.pool.conv, self.pool.ssm, index.pop("rows"), embeds, **index)

    @torch.no_grad()
    def step(self, state: MambaState, embeds: torch.Tensor) -> torch.Tensor:
        """Feed one token (B, 1, H); logits (B, V)."""
        return self.step_many([state], embeds)

    @torch.no_grad()
    def step_many(self, states: list[MambaState], embeds: torch.Tensor) -> torch.Tensor:
        """One token for several branches at once (rows of ``embeds`` follow ``states``' rows in order)."""
        if embeds.dim() != 3 or embeds.shape[1] != 1:
            raise ValueError(f"CudaMambaRuntime.step takes one token (B, 1, H); got {tuple(embeds.shape)}. "
                             "Use prefill for chunks.")
        if self.kernels == "torch":
            return self._step_torch(states, embeds)
        if embeds.shape[0] != sum(s.batch_size for s in states):
            raise ValueError(f"CudaMambaRuntime.step_many: {embeds.shape[0]} input rows for "
                             f"{sum(s.batch_size for s in states)} state rows.")
        return self._forward(states, embeds)

    # ------------------------------------------------------------------ dispatch
    def _forward(self, states: list[MambaState], embeds: torch.Tensor) -> torch.Tensor:
        """Last-position logits of a chunk over several states: graph replay when possible."""
        embeds = embeds.to(device=self.device, dtype=self.dtype)
        length = embeds.shape[1]
        rows = [r for s in states for r in (self._pool_rows(s) or [])]
        graphable = len(rows) == embeds.shape[0] and self.use_graphs and length <= self.graph_max_len \
            and len(rows) <= GRAPH_BUCKETS[-1]
        if graphable:
            logits = self._replay({"rows": rows}, embeds)
        else:
            logits = self._eager(states, embeds)
        for s in states:
            s.advance(length)
        return logits

    def _eager(self, states: list[MambaState], embeds: torch.Tensor) -> torch.Tensor:
        row_ids, conv, ssm = self._buffers(states)
        logits = None
        for start in range(0, embeds.shape[1], self.prefill_chunk):
            logits = self._run(conv, ssm, row_ids, embeds[:, start:start + self.prefill_chunk])
        return logits

    def _buffers(self, states: list[MambaState]):
        """(row index tensor, conv buffer, ssm buffer) addressing ``states``: pool rows or a lone state."""
        rows = [self._pool_rows(s) for s in states]
        if all(r is not None for r in rows):
            flat = [i for r in rows for i in r]
            return torch.tensor(flat, device=self.device), self.pool.conv, self.pool.ssm
        if len(states) != 1:
            raise ValueError("CudaMambaRuntime.step_many: batching states that are not pool rows is not "
                             "supported; make them with runtime.new_state/fork.")
        state = states[0]
        return torch.arange(state.batch_size, device=self.device), state.conv, state.ssm

    def _step_torch(self, states: list[MambaState], embeds: torch.Tensor) -> torch.Tensor:
        """Reference path: batch the branches into one state, run the torch math, write them back."""
        if len(states) == 1:
            return super().prefill(states[0], embeds)
        batch = MambaState.cat(states)
        logits = super().prefill(batch, embeds)
        start = 0
        for s in states:
            s.copy_(batch.rows(start, start + s.batch_size))
            start += s.batch_size
        return logits

    # ------------------------------------------------------------------ graphs
    def _replay(self, index: dict[str, list[int]], embeds: torch.Tensor) -> torch.Tensor:
        """Run from the graph of (bucket, length, forking); ``index``: the per-row values of the graph's index
        buffers ("rows" alone, or all four of a forking run, see ``_Graph``)."""
        batch, length = embeds.shape[:2]
        bucket = next(b for b in GRAPH_BUCKETS if b >= batch)
        forking = len(index) > 1
        entry = self._graphs.get((bucket, length, forking)) or self._capture(bucket, length, forking)
        pad = {"rows": self.scratch_row, "new_rows": self.scratch_row, "snap_pos": 0, "logit_pos": length - 1,
               "end_pos": length}
        for name, values in index.items():
            padded = tuple(values) + (pad[name],) * (bucket - batch)
            if entry.last.get(name) != padded:  # same branches as last time (a decode loop): no copy
                entry.index[name].copy_(torch.tensor(padded))
                entry.last[name] = padded
        entry.embeds[:batch].copy_(embeds)
        entry.graph.replay()
        return entry.logits[:batch].clone()

    def _capture(self, bucket: int, length: int, forking: bool = False) -> _Graph:
        """Capture one run of ``bucket`` rows x ``length`` tokens over the pool (warm-up on scratch rows);
        ``forking``: with the index buffers of ``_forking_run``."""
        names = ("rows", "new_rows", "snap_pos", "logit_pos", "end_pos") if forking else ("rows",)
        start = {"rows": self.scratch_row, "new_rows": self.scratch_row, "snap_pos": 0, "logit_pos": length - 1,
                 "end_pos": length}
        index = {name: torch.full((bucket,), start[name], dtype=torch.long, device=self.device) for name in names}
        embeds = torch.randn(bucket, length, self.config.hidden_size, device=self.device).to(self.dtype)

        def run():
            return self._run(self.pool.conv, self.pool.ssm, index["rows"], embeds,
                             **{k: v for k, v in index.items() if k != "rows"})

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compile the Triton kernels, warm cuBLAS
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = run()
        entry = _Graph(graph, index, embeds, logits)
        self._graphs[(bucket, length, forking)] = entry
        logger.info("captured CUDA graph: %d rows x %d tokens%s", bucket, length, ", forking" if forking else "")
        return entry

    # ------------------------------------------------------------------ linear layers
    def _skinny(self, name: str, rows: int) -> bool:
        return rows <= cuda_kernels.SKINNY_MAX_ROWS and self.skinny_plan[(name, cuda_kernels._block_m(rows))]

    def _linear(self, name: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``F.linear`` without bias (in the weight dtype); our skinny kernel where it was measured faster."""
        if self._skinny(name, x.numel() // x.shape[-1]) and x.stride(-1) == 1:
            return cuda_kernels.skinny_linear(x, weight, pdl=self.split_pdl)
        return F.linear(x.to(weight.dtype), weight)

    def _plan_linears(self, choice: str) -> dict[tuple[str, int], bool]:
        """Per (layer, tile height): our skinny kernel (True) or cuBLAS. "skinny": always, "cublas": never,
        "auto" on CUDA: where it is faster for 16, 32 and 64 rows over all layers' weights (timed from CUDA
        graphs so launch overhead and the L2 cache do not decide). For x_proj and out_proj the skinny
        kernel adds into an fp32 buffer, which saves the caller an add (out_proj) or a cast (x_proj)."""
        if choice not in ("auto", "skinny", "cublas"):
            raise ValueError(f"CudaMambaRuntime: linear={choice!r}; use auto, skinny or cublas.")
        plan = {(name, block_m): choice == "skinny" for name in LINEAR_LAYERS for block_m in ROW_CLASSES}
        if self.kernels == "torch":
            return dict.fromkeys(plan, False)
        if choice != "auto" or self.dtype == torch.float32 or self.device.type != "cuda":
            return plan  # fp32 weights: tl.dot would multiply in TF32, cuBLAS keeps full fp32
        groups = {"in_proj": [w.in_proj for w in self._layers], "x_proj": [w.x_proj for w in self._layers],
                  "dt_proj": [w.dt_proj for w in self._layers], "out_proj": [w.out_proj for w in self._layers],
                  "lm_head": [self.lm_head.weight]}
        for name, weights in groups.items():
            for block_m in ROW_CLASSES:
                # dt_proj reads x_proj's output: fp32 when x_proj adds into its accumulator (cuBLAS then
                # needs a cast kernel first, the skinny kernel rounds while loading)
                fp32_input = name == "dt_proj" and plan[("x_proj", block_m)]
                plan[(name, block_m)] = self._skinny_is_faster(name, weights, block_m, fp32_input)
        return plan

    def _skinny_is_faster(self, name: str, weights: list[torch.Tensor], rows: int, fp32_input: bool = False) -> bool:
        n_out, n_in = weights[0].shape
        x = torch.randn(rows, n_in, device=self.device)
        x = x if fp32_input else x.to(self.dtype)
        cublas = _graph_ms(lambda: [F.linear(x.to(w.dtype), w) for w in weights])
        if name in ADDING_LAYERS:
            acc = torch.zeros(rows, n_out, device=self.device)
            skinny = _graph_ms(lambda: [cuda_kernels.skinny_linear_add_(acc, x, w, pdl=self.split_pdl)
                                        for w in weights])
        else:
            skinny = _graph_ms(lambda: [cuda_kernels.skinny_linear(x, w, pdl=self.split_pdl) for w in weights])
        logger.info("linear %s %s, %d rows: cuBLAS %.1f us, skinny %.1f us per layer", name, (n_out, n_in), rows,
                    cublas * 1e3 / len(weights), skinny * 1e3 / len(weights))
        return skinny < cublas

    # ------------------------------------------------------------------ math
    def _layer_weights(self, block) -> _LayerWeights:
        mixer = block.mixer
        return _LayerWeights(
            norm=block.norm.weight, in_proj=mixer.in_proj.weight,
            conv_w=mixer.conv1d.weight.view(self.d_inner, self.d_conv),
            conv_b=mixer.conv1d.bias, x_proj=mixer.x_proj.weight, dt_proj=mixer.dt_proj.weight,
            dt_bias=mixer.dt_proj.bias, A=-torch.exp(mixer.A_log.detach().float()).contiguous(),
            D=mixer.D, out_proj=mixer.out_proj.weight)

    def _run(self, conv: torch.Tensor, ssm: torch.Tensor, rows: torch.Tensor, embeds: torch.Tensor,
             all_logits: bool = False, new_rows: torch.Tensor | None = None, snap_pos: torch.Tensor | None = None,
             logit_pos: torch.Tensor | None = None, end_pos: torch.Tensor | None = None) -> torch.Tensor:
        """All blocks over a chunk (B, L, H) for state rows ``rows`` of (conv, ssm), in place; fp32 logits.

        Forking (``_forking_run``): the final state goes to ``new_rows``, per row the state after
        ``snap_pos`` positions back to ``rows``, and the logits are those of position ``logit_pos``."""
        batch, length, hidden = embeds.shape
        if snap_pos is not None and length == 1:
            raise ValueError("CudaMambaRuntime._run: a snapshot needs a chunk of 2+ tokens.")
        fork = {"new_rows": new_rows, "snap_rows": rows, "snap_pos": snap_pos, "end_pos": end_pos} \
            if snap_pos is not None else {}
        residual = embeds.reshape(batch * length, hidden).to(torch.float32, copy=True)  # (M, H) fp32 residual
        if length == 1 and batch <= self.fused_max_rows and self.decode == "fused":
            buffers = self._decode_buffers(batch)
            for layer in range(len(self._layers)):
                self._decode_layer(layer, conv[layer], ssm[layer], rows, residual, buffers)
            logits = self._head(residual, None)  # (B, V)
            return logits if not all_logits else logits.view(batch, 1, -1)
        normed = torch.empty(batch * length, hidden, dtype=self.dtype, device=self.device)  # (M, H)
        xproj_acc = None
        if self._xproj_adds(batch, length):  # cleared by add_rmsnorm in every layer
            xproj_acc = torch.empty(batch * length, self.dt_rank + 2 * self.d_state, dtype=torch.float32,
                                    device=self.device)
        delta = None
        for layer, w in enumerate(self._layers):
            cuda_kernels.add_rmsnorm(residual, delta, w.norm, self.backbone.layers[layer].norm.variance_epsilon,
                                     normed, zero=xproj_acc, pdl=self.split_pdl)
            delta = self._mixer_rows(w, normed.view(batch, length, hidden), conv[layer], ssm[layer], rows,
                                     xproj_acc, residual, fork)  # None when out_proj added itself into residual
        if not all_logits:  # only the last position (or each row's logit_pos) feeds the head
            pick = (slice(None), -1) if logit_pos is None else (torch.arange(batch, device=self.device), logit_pos)
            residual = residual.view(batch, length, hidden)[pick].contiguous()  # (B, H)
            delta = None if delta is None else delta.view(batch, length, hidden)[pick].contiguous()
        logits = self._head(residual, delta)  # (M, V)
        return logits if not all_logits else logits.view(batch, length, -1)

    def _xproj_adds(self, batch: int, length: int) -> bool:
        """Whether x_proj adds into a zeroed fp32 (B*L, R + 2N) buffer: in the conv kernel (a decode step of
        few rows) or in the skinny kernel (split-K), rather than returning its output."""
        return (length == 1 and batch <= FUSED_DT_MAX_BATCH) or self._skinny("x_proj", batch * length)

    def _head(self, residual: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """Final RMSNorm (of residual + delta) and LM head: (M, H) fp32 -> fp32 logits (M, V)."""
        final = torch.empty(residual.shape, dtype=self.dtype, device=self.device)  # (M, H)
        norm_f = self.backbone.norm_f
        cuda_kernels.add_rmsnorm(residual, delta, norm_f.weight, norm_f.variance_epsilon, final, round_input=False,
                                 pdl=self.split_pdl)
        return self._linear("lm_head", final, self.lm_head.weight).float()  # (M, V)

    def _decode_buffers(self, batch: int) -> dict[str, torch.Tensor]:
        """Activations of the "fused" decode path for ``batch`` rows, reused by every layer."""
        d_inner, width = self.d_inner, self.dt_rank + 2 * self.d_state
        return {"xz": torch.empty(batch, 2 * d_inner, dtype=self.dtype, device=self.device),  # in_proj output
                "xc": torch.empty(batch, d_inner, dtype=self.dtype, device=self.device),  # conv + SiLU output
                "y": torch.empty(batch, d_inner, dtype=self.dtype, device=self.device),  # gated scan output
                "xdb": torch.empty(batch, width, dtype=torch.float32, device=self.device)}  # x_proj (fp32 sum)

    def _decode_layer(self, layer: int, conv: torch.Tensor, ssm: torch.Tensor, rows: torch.Tensor,
                      residual: torch.Tensor, buffers: dict[str, torch.Tensor]) -> None:
        """One block for one token of a few rows ("fused" decode): ``residual`` (B, H) fp32 += mixer(norm).

        Four launches: RMSNorm + in_proj; conv + SiLU + x_proj (split-K into ``xdb``, which the first
        kernel clears); dt_proj + scan + D skip + SiLU(z) gate; out_proj added into the residual."""
        w = self._layers[layer]
        d_inner, rank, n_state = self.d_inner, self.dt_rank, self.d_state
        xz, xc, y, xdb = buffers["xz"], buffers["xc"], buffers["y"], buffers["xdb"]
        eps = self.backbone.layers[layer].norm.variance_epsilon
        dt_low, B, C = xdb[:, None, :rank], xdb[:, None, rank:rank + n_state], xdb[:, None, rank + n_state:]
        options = self._fused_options[residual.shape[0]]
        cuda_kernels.rmsnorm_gemv(residual, w.norm, eps, w.in_proj, xz, zero=xdb, pdl=self.pdl,
                                  **options["in_proj"])  # (B, 2D)
        cuda_kernels.causal_conv_silu_xproj(xz[:, :d_inner], conv, rows, w.conv_w, w.conv_b, xc, w.x_proj, xdb,
                                            pdl=self.pdl, **options["conv"])  # (B, D), (B, R + 2N)
        cuda_kernels.selective_scan_rows(xc[:, None], dt_low, w.dt_proj, w.dt_bias, w.A, B, C, w.D,
                                         xz[:, None, d_inner:], ssm, rows, y[:, None], pdl=self.pdl,
                                         block_d=scan_block(residual.shape[0], 1))  # (B, 1, D)
        cuda_kernels.gemv_add_(residual, y, w.out_proj, pdl=self.pdl, **options["out_proj"])  # residual += ...

    def _mixer_rows(self, w: _LayerWeights, hidden: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor,
                    rows: torch.Tensor, xproj_acc: torch.Tensor | None = None,
                    residual: torch.Tensor | None = None, fork: dict | None = None) -> torch.Tensor | None:
        """One mixer over (B, L, H) from state rows; returns out_proj output (B*L, H), or None when it
        was added straight into ``residual`` (B*L, H) fp32 (the skinny kernel, where it is faster).

        ``xproj_acc`` (B*L, R + 2N) fp32, zeroed: x_proj adds into it, in the conv kernel for a decode
        step of few rows, else in the skinny kernel. ``fork``: keyword arguments of the conv and scan
        kernels that send the final state elsewhere (chunks)."""
        fork = fork or {}
        batch, length, _ = hidden.shape
        rows_total = batch * length
        d_inner, rank, n_state = self.d_inner, self.dt_rank, self.d_state
        xz = self._linear("in_proj", hidden, w.in_proj)  # (B, L, 2D)
        x, z = xz[..., :d_inner], xz[..., d_inner:]  # (B, L, D) views
        xc = torch.empty(batch, length, d_inner, dtype=self.dtype, device=self.device)
        fused_dt = length == 1 and batch <= FUSED_DT_MAX_BATCH  # per-row kernels
        rows_scan = length == 1 and not fused_dt and self._rows_scan  # dt_proj + scan per row block (tl.dot)
        if fused_dt:
            cuda_kernels.causal_conv_silu_xproj(x[:, 0], conv, rows, w.conv_w, w.conv_b, xc[:, 0], w.x_proj,
                                                xproj_acc, pdl=self.split_pdl)
        else:
            cuda_kernels.causal_conv_silu(x, conv, rows, w.conv_w, w.conv_b, xc, block_d=conv_block(batch),
                                          pdl=self.split_pdl, **fork)  # (B, L, D)
        if xproj_acc is None:
            xdb = self._linear("x_proj", xc, w.x_proj)  # (B, L, R + 2N)
        else:
            if not fused_dt:
                cuda_kernels.skinny_linear_add_(xproj_acc, xc.view(rows_total, d_inner), w.x_proj, pdl=self.split_pdl)
            xdb = xproj_acc.view(batch, length, -1)  # (B, L, R + 2N) fp32, rounded to the model dtype on use
        dt_low, B, C = xdb[..., :rank], xdb[..., rank:rank + n_state], xdb[..., rank + n_state:]  # views
        if self._state_update is not None and length == 1:
            xdb = xdb.to(self.dtype)  # x_proj output in the model dtype, as transformers has it
            dt_low, B, C = xdb[..., :rank], xdb[..., rank:rank + n_state], xdb[..., rank + n_state:]
            dt = self._linear("dt_proj", dt_low[:, 0], w.dt_proj)  # (B, D), bias added in the kernel
            y = self._state_update(ssm, xc[:, 0], dt, w.A, B[:, 0], C[:, 0], w.D, z=z[:, 0],
                                   dt_bias=w.dt_bias, dt_softplus=True,
                                   state_batch_indices=rows).unsqueeze(1)  # (B, 1, D)
        elif rows_scan:
            y = torch.empty_like(xc)
            cuda_kernels.selective_scan_rows_dot(xc[:, 0], dt_low[:, 0], w.dt_proj, w.dt_bias, w.A, B[:, 0], C[:, 0],
                                                 w.D, z[:, 0], ssm, rows, y[:, 0], pdl=self.split_pdl,
                                                 **self._split_options["scan"])  # (B, 1, D)
        else:
            y = torch.empty_like(xc)
            # dt_proj inside the scan for a decode step of few rows; a GEMM first for chunks (fused, every
            # token of a chunk would reduce a (channels x rank) tile inside the serial loop). An fp32
            # dt_low is rounded to the model dtype first (by the skinny kernel, or by _linear's cast).
            dt = None if fused_dt else self._linear("dt_proj", dt_low, w.dt_proj)  # (B, L, D)
            cuda_kernels.selective_scan_rows(xc, dt_low, w.dt_proj, w.dt_bias, w.A, B, C, w.D, z, ssm, rows, y,
                                             block_d=scan_block(batch, length), dt=dt, pdl=self.split_pdl,
                                             **fork)  # (B, L, D)
        y = y.view(rows_total, d_inner)  # (M, D)
        if residual is not None and self._skinny("out_proj", rows_total):
            cuda_kernels.skinny_linear_add_(residual, y, w.out_proj, pdl=self.split_pdl)  # residual += out_proj(y)
            return None
        return self._linear("out_proj", y, w.out_proj)  # (M, H)


def _graph_ms(fn, replays: int = 20) -> float:
    """Median ms of replaying ``fn`` captured in a CUDA graph (warm-up run first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
