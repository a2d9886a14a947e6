"""Stage 4's streaming encode: every ~3 s segment through the encoder on its own (the plain definition, as
stage 4 ran until session 12) against one padded encoder pass over all segments of the batch
(`DuplexForward.encode_streaming`), forward + backward, at the speedrun encoder's shape. It also prints the
largest difference between the two, which should be float rounding only.

Usage::

    python bench/stage4_encode.py [--device cuda] [--batch 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from modules.speech import build_speech_encoder  # noqa: E402
from src.brain import DuplexForward, streaming_segments  # noqa: E402

RATE = 16000


def per_segment(forward: DuplexForward, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """The plain definition: one encoder call per segment, one adapter pass per row: [(P_row, H)]."""
    encoder = forward.speech_encoder
    full = torch.ones(1, device=rows[0].device)
    out = []
    for row in rows:
        frames = [encoder.encoder(encoder.cnn(encoder.normalizer(encoder.compute_features(s[None]), full)))
                  for s in streaming_segments(row, forward.segment_seconds)]  # [(1, T'_s, D)]
        out.append(encoder.adapter(torch.cat(frames, dim=1))[0])
    return out


def timed(fn, device, repeats: int) -> float:
    """Median seconds of fn() (forward + backward)."""
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times[1:])[len(times[1:]) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64, help="utterances per batch (the speedrun's 64)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    encoder = build_speech_encoder(d_model=144, num_layers=4, d_ffn=576, kernel_size=31, adapter_hidden=256,
                                   lm_dim=256).to(device)  # hparams/model/speedrun.yaml
    encoder.train()
    with torch.no_grad():
        encoder.normalizer(torch.randn(4, 200, 80, device=device))
    encoder.eval()  # no dropout: both paths must give the same numbers
    forward = DuplexForward(encoder, lm=None, segment_seconds=3.0)
    seconds = torch.empty(args.batch).uniform_(1.5, 9.0)  # corpus rows: single and multi-turn
    rows = [torch.randn(int(s * RATE), device=device) * 0.1 for s in seconds]
    batch = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B, N_max)
    wav_lens = torch.tensor([r.shape[0] / batch.shape[1] for r in rows], device=device)

    def loop():
        sum(e.sum() for e in per_segment(forward, rows)).backward()

    def one_pass():
        forward.encode_streaming(batch, wav_lens)[0].sum().backward()

    with torch.no_grad():
        reference = per_segment(forward, rows)
        embeds, lengths = forward.encode_streaming(batch, wav_lens)
        gap = max((embeds[b, :int(lengths[b])] - r).abs().max().item() for b, r in enumerate(reference))
    segments = sum(len(streaming_segments(r, 3.0)) for r in rows)
    slow, fast = timed(loop, device, args.repeats), timed(one_pass, device, args.repeats)
    print(f"{args.batch} utterances, {segments} segments, {float(seconds.sum()) / 60:.1f} min of audio on {device}")
    print(f"per segment: {slow:.3f} s/batch; one pass: {fast:.3f} s/batch; {slow / fast:.1f}x; "
          f"largest difference {gap:.2e}")


if __name__ == "__main__":
    main()
