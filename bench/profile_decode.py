"""Where a decode step's time goes: GPU time per kernel of one full-size step (torch.profiler); with
``--length L`` the same for a prefill chunk of L tokens (the duplex listen-and-probe pass is 21).

Runs the decode step eagerly (no graph, so every kernel is visible to the profiler; the kernels are
the ones the graph replays) and prints the GPU time per step of each kernel kind against the step
time measured from the graph, so the gap between the sum of kernel times and the graph step is the
launch gaps/tails.

Usage::

    python bench/profile_decode.py [--batch 1] [--length 1] [--kernels triton] [--decode fused|split] [--no-pdl]
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from duplex.cuda_runtime import CudaMambaRuntime  # noqa: E402


def kernel_times_us(runtime, state, embeds, steps: int) -> dict[str, float]:
    """GPU µs per step of each kernel name over ``steps`` eager steps."""
    from torch.profiler import ProfilerActivity, profile
    activity = ProfilerActivity.CUDA if embeds.is_cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            runtime.prefill(state, embeds)  # a decode step when L = 1
        common.synchronize(embeds.device)
    totals = collections.Counter()
    for event in prof.key_averages():
        time_us = event.device_time_total if embeds.is_cuda else event.cpu_time_total
        if time_us > 0 and (not embeds.is_cuda or event.device_type == torch.autograd.DeviceType.CUDA):
            totals[event.key[:70]] += time_us / steps
    return dict(totals)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=1, help="tokens per call (1: a decode step)")
    parser.add_argument("--kernels", default="auto")
    parser.add_argument("--decode", default="auto", help="fused (4 launches per layer) or split")
    parser.add_argument("--no-pdl", action="store_true", help="no programmatic dependent launch")
    parser.add_argument("--fused-max-rows", type=int, default=None, help="rows the fused path takes")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    device = common.pick_device(args.tiny)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = common.build_mamba(args.tiny, device, dtype)
    options = {"kernels": args.kernels, "decode": args.decode, "pdl": False if args.no_pdl else None}
    if args.fused_max_rows is not None:
        options["fused_max_rows"] = args.fused_max_rows
    eager = CudaMambaRuntime(model, max_rows=args.batch + 1, use_graphs=False, **options)
    state = eager.new_state(args.batch)
    embeds = eager.embed(torch.randint(0, model.config.vocab_size, (args.batch, args.length), device=device))
    for _ in range(3):
        eager.prefill(state, embeds)
    totals = kernel_times_us(eager, state, embeds, args.steps)
    eager_ms = common.time_ms(lambda: eager.prefill(state, embeds), device)
    eager.release(state)
    graph_ms = None
    if device.type == "cuda":
        graphed = CudaMambaRuntime(model, max_rows=args.batch + 1, **options)
        gstate = graphed.new_state(args.batch)
        graph_ms = common.time_ms(lambda: graphed.prefill(gstate, embeds), device, warmup=5, iters=50)
    total = sum(totals.values())
    what = "decode step" if args.length == 1 else f"prefill of {args.length} tokens"
    print(f"\n== {what}, batch {args.batch}, kernels {eager.kernels}, decode {eager.decode}, pdl {eager.pdl}: "
          f"GPU kernel time {total / 1e3:.3f} ms/step, "
          f"eager {eager_ms:.3f} ms, graph {graph_ms if graph_ms is None else round(graph_ms, 3)} ms")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:15]:
        print(f"{us:9.1f} us/step {100 * us / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
