"""CPU numbers for the duplex engine's reference path (no GPU needed).

    python -m bench.duplex_cpu [--threads 1] [--output bench/results/duplex_cpu.json]

Measures (median of repeats, milliseconds):
* a 15-position speech slice (3 s) added to a live state as one chunk vs as 15 single-token steps, on a random
  Mamba with mamba-130m's shape (24 layers, hidden 768): exact either way, the chunk is what the engine does;
* forking (clone) and rolling back (copy_) a state of the full model's shape (64 layers, d_inner 5120, bf16 conv,
  fp32 SSM = 22.5 MiB);
* one 3 s slice of the tiny duplex session (duplex/duplex_tiny.yaml: encode, prefill, probe, 4 reply tokens);
* the host side of a pool fork (``CudaMambaRuntime.fork`` + ``release`` on a tiny model, 72-row pool, microseconds):
  on a GPU a fork is host-bound, so this is what its bookkeeping costs.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch
from transformers import MambaConfig, MambaForCausalLM

from duplex.cuda_runtime import CudaMambaRuntime
from duplex.engine import load_engine
from duplex.runtime import TorchMambaRuntime
from duplex.state import MambaState

ROOT = pathlib.Path(__file__).resolve().parents[1]


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def chunk_vs_steps(repeats: int) -> dict:
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2)
    runtime = TorchMambaRuntime(MambaForCausalLM(config).eval())
    context = runtime.new_state()
    runtime.prefill(context, runtime.embed(torch.randint(0, 50280, (1, 40))))
    speech = torch.randn(1, 15, 768) * 0.02  # (1, 15, H): one 3 s slice

    def chunk():
        runtime.prefill(context.clone(), speech)

    def steps():
        state = context.clone()
        for t in range(speech.shape[1]):
            runtime.step(state, speech[:, t:t + 1])

    return {"slice_chunk_ms": median_ms(chunk, repeats), "slice_15_steps_ms": median_ms(steps, repeats)}


def fork_cost(repeats: int) -> dict:
    state = MambaState.zeros(64, 1, 5120, 4, 16, dtype=torch.bfloat16)
    other = state.clone()
    return {"state_mib": state.nbytes / 2**20, "fork_clone_ms": median_ms(state.clone, repeats),
            "rollback_copy_ms": median_ms(lambda: other.copy_(state), repeats)}


def pool_fork_host(repeats: int, forks: int = 2000) -> dict:
    lm = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, state_size=4, expand=2,
                                      conv_kernel=4)).eval()
    runtime = CudaMambaRuntime(lm, max_rows=72, kernels="torch")
    for _ in range(8):  # the free run starts past a few used rows, as in a session
        runtime.new_state(1)
    main = runtime.new_state(1)

    def fork_and_release():
        for _ in range(forks):
            runtime.release(runtime.fork(main))

    return {"pool_fork_release_host_us": median_ms(fork_and_release, repeats) * 1e3 / forks}


def tiny_session_slice(repeats: int) -> dict:
    engine = load_engine(ROOT / "duplex" / "duplex_tiny.yaml")
    session = engine.new_session(seed=0)
    wav = torch.randn(48000, generator=torch.Generator().manual_seed(0)) * 0.1
    return {"tiny_session_slice_ms": median_ms(lambda: session.feed(wav), repeats)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"threads": torch.get_num_threads(), **chunk_vs_steps(args.repeats), **fork_cost(args.repeats),
               **pool_fork_host(args.repeats), **tiny_session_slice(args.repeats)}
    text = json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}, indent=2)
    print(text)
    if args.output:
        pathlib.Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
