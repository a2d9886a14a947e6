"""Where the speech encoder's time goes for one 3 s slice: GPU time per kernel (torch.profiler) of the
features (fbank + normaliser, eager) and of the body (CNN + ConMamba + adapter, bf16 autocast), against
the wall time of the whole call with the body replayed from a CUDA graph.

Usage::

    python bench/profile_encoder.py [--tiny]
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.run_all import SLICE_SECONDS, build_encoder  # noqa: E402
from duplex.cuda_encoder import GraphedSpeechEncoder  # noqa: E402


def gpu_us(fn, device, iters: int = 5) -> dict[str, float]:
    """GPU µs per call of each kernel name (CPU time on CPU)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
        common.synchronize(device)
    totals = collections.Counter()
    for event in prof.key_averages():
        time_us = event.device_time_total if device.type == "cuda" else event.cpu_time_total
        if time_us > 0 and (device.type != "cuda" or event.device_type == torch.autograd.DeviceType.CUDA):
            totals[event.key[:70]] += time_us / iters
    return dict(totals)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    device = common.pick_device(args.tiny)
    encoder = build_encoder(args.tiny, device)
    wav = torch.randn(int(16000 * SLICE_SECONDS), device=device) * 0.1
    eager = GraphedSpeechEncoder(encoder, wav.numel(), use_graph=False)
    graphed = GraphedSpeechEncoder(encoder, wav.numel(), use_graph=device.type == "cuda")
    with torch.no_grad():
        feats = eager._features(wav)
        for _ in range(3):
            eager._body(feats)
        parts = {"features": gpu_us(lambda: eager._features(wav), device),
                 "body": gpu_us(lambda: eager._body(feats), device)}
    whole_ms = common.time_ms(lambda: graphed(wav), device)
    features_ms = common.time_ms(lambda: eager._features(wav), device)
    print(f"\n== speech encoder, one {SLICE_SECONDS:.0f} s slice: whole call {whole_ms:.3f} ms (body graphed: "
          f"{graphed.graphed}); features alone {features_ms:.3f} ms eager")
    for part, totals in parts.items():
        total = sum(totals.values())
        print(f"-- {part}: GPU kernel time {total / 1e3:.3f} ms, {sum(1 for _ in totals)} kernel kinds")
        for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:12]:
            print(f"{us:9.1f} us {100 * us / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
