"""Block sizes of the fused decode path's two GEMVs (in_proj with RMSNorm, out_proj into the residual).

Times each configuration over the 64 layers' full-size weights (random bf16) from a CUDA graph, chained
with programmatic dependent launch as in the runtime, for 1 and 2 rows, against cuBLAS on the same
weights, and prints GB/s against the measured copy rate. in_proj is timed in both forms: one output
tile per program, and persistent (a fixed number of programs per SM looping over tiles); the conv +
x_proj kernel per channel block (its x_proj adds with atomics: fewer, larger blocks mean fewer adds per
output; cuBLAS there is x_proj alone, for scale). The runtime's defaults
(``duplex/cuda_kernels.py``: FUSED_DECODE_TILES) come from this table.

Usage::

    python bench/tune_gemv.py [--rows 1 2] [--tiny]
"""
from __future__ import annotations

import argparse
import itertools
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from duplex import cuda_kernels  # noqa: E402
from duplex.cuda_runtime import _graph_ms  # noqa: E402

IN_PROJ_CONFIGS = [{"block_n": n, "num_warps": w} for n, w in itertools.product((4, 8, 16), (4, 8))]
# the persistent variant: (block_n, num_warps, programs per SM[, rows' reductions joined]) without
# register spills for 1 and 2 rows (bench/kernel_regs.py)
PERSISTENT_CONFIGS = {1: [(4, 4, 2), (4, 4, 3), (4, 4, 4), (8, 8, 1), (8, 8, 2), (8, 4, 2)],
                      2: [(4, 4, 2), (8, 8, 1), (4, 4, 2, True), (4, 4, 3, True), (8, 8, 1, True), (4, 8, 2, True)]}
OUT_PROJ_CONFIGS = [{"block_n": n, "block_k": k, "num_warps": w}
                    for n, k, w in ((64, 256, 8), (32, 256, 4), (32, 512, 8), (128, 128, 8), (64, 512, 8),
                                    (16, 1024, 8), (128, 64, 4), (256, 64, 8), (64, 128, 4))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    device = common.cuda_for_timing(args.tiny, "tune_gemv")
    if device is None:
        return
    cfg = common.mamba_config(args.tiny)
    hidden, inner, layers = cfg.hidden_size, cfg.hidden_size * cfg.expand, cfg.num_hidden_layers
    gen = torch.Generator(device=device).manual_seed(0)
    w_in = [torch.randn(2 * inner, hidden, device=device, generator=gen).to(torch.bfloat16) for _ in range(layers)]
    w_out = [torch.randn(hidden, inner, device=device, generator=gen).to(torch.bfloat16) for _ in range(layers)]
    norm = torch.ones(hidden, device=device, dtype=torch.bfloat16)
    bandwidth = common.copy_bandwidth_gbs(device)
    print(f"copy rate {bandwidth:.0f} GB/s; per layer: in_proj {w_in[0].nbytes / 1e6:.1f} MB, "
          f"out_proj {w_out[0].nbytes / 1e6:.1f} MB")
    for rows in args.rows:
        residual = torch.randn(rows, hidden, device=device)
        xz = torch.empty(rows, 2 * inner, device=device, dtype=torch.bfloat16)
        y = torch.randn(rows, inner, device=device).to(torch.bfloat16)
        normed = residual.to(torch.bfloat16)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        configs = {str(c): (lambda c=c: [cuda_kernels.rmsnorm_gemv(residual, norm, 1e-5, w, xz, pdl=True, **c)
                                         for w in w_in]) for c in IN_PROJ_CONFIGS}
        for block_n, warps, per_sm, *join in PERSISTENT_CONFIGS.get(rows, []):
            c = {"block_n": block_n, "num_warps": warps, "programs": per_sm * sms, "join_rows": bool(join)}
            configs[f"persistent {c} ({per_sm}/SM)"] = \
                lambda c=c: [cuda_kernels.rmsnorm_gemv(residual, norm, 1e-5, w, xz, pdl=True, **c) for w in w_in]
        report("in_proj", rows, w_in, bandwidth, lambda: [F.linear(normed, w) for w in w_in], configs)
        conv_state = torch.zeros(layers, rows, inner, 4, device=device, dtype=torch.bfloat16)
        conv_w = torch.randn(inner, 4, device=device).to(torch.bfloat16)
        x_proj = [torch.randn(cfg.time_step_rank + 2 * cfg.state_size, inner, device=device).to(torch.bfloat16)
                  for _ in range(layers)]
        acc = torch.zeros(rows, x_proj[0].shape[0], device=device)
        row_ids = torch.arange(rows, device=device)
        report("conv + SiLU + x_proj", rows, x_proj, bandwidth, lambda: [F.linear(y, w) for w in x_proj],
               {f"block_d {d}": (lambda d=d: [cuda_kernels.causal_conv_silu_xproj(
                   xz[:, :inner], conv_state[i], row_ids, conv_w, None, y, x_proj[i], acc, block_d=d, pdl=True)
                   for i in range(layers)]) for d in (16, 32, 64, 128)})
        report("out_proj", rows, w_out, bandwidth, lambda: [F.linear(y, w) for w in w_out],
               {str(c): (lambda c=c: [cuda_kernels.gemv_add_(residual, y, w, pdl=True, **c) for w in w_out])
                for c in OUT_PROJ_CONFIGS})


def report(name, rows, weights, bandwidth, cublas, configs) -> None:
    """Print µs per layer and GB/s of cuBLAS and each configuration, best last."""
    nbytes = weights[0].nbytes
    times = {"cuBLAS (F.linear)": _graph_ms(cublas) * 1e3 / len(weights)}
    for label, fn in configs.items():
        times[label] = _graph_ms(fn) * 1e3 / len(weights)
    common.print_rates(name, rows, nbytes, bandwidth, times)


if __name__ == "__main__":
    main()
