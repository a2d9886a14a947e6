"""One training step (forward + backward) of a Mamba LM on the pure-torch path, with transformers' step-by-step
scan and with mambapy's parallel scan (`modules.lm.use_parallel_scan`), and how far their results differ.

Why: without mamba-ssm, transformers' step loop makes the backward pass grow with the square of the sequence
length. This measures what the parallel scan saves, as a ratio taken in one run on one machine.

Usage::

    python bench/lm_scan_speed.py                         # the speedrun LM (hparams/model/speedrun.yaml), 4 x 256
    python bench/lm_scan_speed.py --batch 2 --lengths 64 128 256 --device cuda:0
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modules import lm as lm_module  # noqa: E402
from modules.model import load_model_hparams  # noqa: E402


def speedrun_lm_config() -> dict:
    """The LM numbers of the speedrun model, read by the model YAML's own loader (built weightless)."""
    with torch.device("meta"):
        return dict(load_model_hparams(REPO / "hparams" / "model" / "speedrun.yaml")["lm_config"])


def one_step(model, ids: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """Seconds of one forward + backward, the loss, and the first layer's A_log gradient."""
    model.zero_grad(set_to_none=True)
    if ids.is_cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    loss = model(ids, labels=ids).loss
    loss.backward()
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started, loss.item(), model.backbone.layers[0].mixer.A_log.grad.clone()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="steps per setting; the fastest is reported")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("mambapy") is None:
        print("mambapy is not installed (pip install -r requirements.txt): nothing to compare", file=sys.stderr)
        return 2
    from transformers import MambaConfig, MambaForCausalLM
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**speedrun_lm_config())).to(args.device).train()
    print(f"| tokens (batch x length) | step-by-step scan (s) | parallel scan (s) | speed-up | loss diff | "
          f"A_log grad max rel diff |\n|---|---|---|---|---|---|")
    for length in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (args.batch, length), device=args.device)
        results = {}
        for parallel in (False, True):
            for layer in model.backbone.layers:
                layer.mixer.use_mambapy = parallel
            runs = [one_step(model, ids) for _ in range(args.repeats)]
            results[parallel] = (min(r[0] for r in runs), runs[-1][1], runs[-1][2])
        (slow, loss_a, grad_a), (fast, loss_b, grad_b) = results[False], results[True]
        rel = ((grad_a - grad_b).abs().max() / grad_a.abs().max().clamp_min(1e-30)).item()
        print(f"| {args.batch} x {length} | {slow:.2f} | {fast:.2f} | {slow / fast:.1f}x | "
              f"{abs(loss_a - loss_b):.1e} | {rel:.1e} |", flush=True)
    parallel = lm_module.use_parallel_scan(model)  # what modules.lm.MambaLM does on this machine
    print(f"\nmodules.lm.MambaLM on this machine: parallel scan {'on' if parallel else 'off'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
