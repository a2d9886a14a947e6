"""Tile sizes of the skinny tensor-core GEMM (``skinny_linear`` / ``skinny_linear_add_``) per layer shape
and row count, against cuBLAS.

Each configuration runs over the 64 layers' full-size weights (random bf16) from a CUDA graph, every
launch with programmatic dependent launch as in the runtime, for the row counts of a decode step of
2, 8 and 64 branches. Prints µs per layer and GB/s against the measured copy rate, best last, and at
the end the best configuration per (layer, rows) in the form of ``cuda_kernels.SKINNY_TUNED``.

Usage::

    python bench/tune_gemm.py [--rows 2 8 64] [--layers in_proj out_proj x_proj dt_proj]
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


def configs(layer: str) -> list[dict]:
    """Candidate tiles: big outputs split over N only, out_proj and x_proj (few outputs) over K too."""
    if layer == "in_proj":  # 2560 -> 10240, stored (bf16)
        grid = itertools.product((32, 64, 128), (64, 128), (4, 8), (4,), (1,))
    elif layer == "out_proj":  # 5120 -> 2560, added into the fp32 residual
        grid = itertools.product((32, 64), (64, 128), (4,), (4,), (1, 2, 4))
    elif layer == "x_proj":  # 5120 -> 192, added into a zeroed fp32 accumulator
        grid = itertools.product((32, 64), (128,), (4,), (4,), (4, 8, 16))
    else:  # dt_proj 160 -> 5120, stored
        grid = itertools.product((32, 64, 128), (64, 256), (4,), (3,), (1,))
    return [{"block_n": n, "block_k": k, "num_warps": w, "num_stages": s, "splits": p} for n, k, w, s, p in grid]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 8, 64])
    parser.add_argument("--layers", nargs="+", default=["in_proj", "out_proj", "x_proj", "dt_proj"])
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    device = common.cuda_for_timing(args.tiny, "tune_gemm")
    if device is None:
        return
    cfg = common.mamba_config(args.tiny)
    hidden, inner, layers = cfg.hidden_size, cfg.hidden_size * cfg.expand, cfg.num_hidden_layers
    rank, n_state = cfg.time_step_rank, cfg.state_size
    shapes = {"in_proj": (2 * inner, hidden), "out_proj": (hidden, inner), "x_proj": (rank + 2 * n_state, inner),
              "dt_proj": (inner, rank)}
    gen = torch.Generator(device=device).manual_seed(0)
    bandwidth = common.copy_bandwidth_gbs(device)
    print(f"copy rate {bandwidth:.0f} GB/s")
    best = {}
    for layer in args.layers:
        weights = [torch.randn(*shapes[layer], device=device, generator=gen).to(torch.bfloat16)
                   for _ in range(layers)]
        add = layer in ("out_proj", "x_proj")
        for rows in args.rows:
            x = torch.randn(rows, shapes[layer][1], device=device).to(torch.bfloat16)
            out = torch.zeros(rows, shapes[layer][0], device=device,
                              dtype=torch.float32 if add else torch.bfloat16)
            times = {"cuBLAS (F.linear)": _graph_ms(lambda: [F.linear(x, w) for w in weights])}
            for config in configs(layer):
                tiles = {k: v for k, v in config.items() if k != "splits"}
                splits = config["splits"]
                if add:
                    def fn(tiles=tiles, splits=splits):
                        return [cuda_kernels.skinny_linear_add_(out, x, w, splits=splits, pdl=True, config=tiles)
                                for w in weights]
                else:
                    def fn(tiles=tiles):
                        return [cuda_kernels.skinny_linear(x, w, out=out, pdl=True, config=tiles) for w in weights]
                try:
                    times[str(config)] = _graph_ms(fn)
                except Exception as err:  # e.g. out of shared memory for a big tile
                    print(f"  skipped {config}: {type(err).__name__}: {str(err)[:80]}")
            common.print_rates(layer, rows, weights[0].nbytes, bandwidth,
                               {k: v * 1e3 / layers for k, v in times.items()})
            label = min((k for k in times if k.startswith("{")), key=times.get, default=None)
            if label is not None:
                best[(layer, rows)] = (label, times[label] * 1e3 / layers, times["cuBLAS (F.linear)"] * 1e3 / layers)
    print("\n== best per (layer, rows): tiles, us/layer, cuBLAS us/layer")
    for (layer, rows), (label, us, cublas) in best.items():
        print(f"{layer:8s} {rows:3d} rows  {us:6.2f}  (cuBLAS {cublas:6.2f})  {label}")


if __name__ == "__main__":
    main()
