"""Session snapshot cost: time and size of ``duplex.snapshot.snapshot`` / ``restore`` (and of the model fingerprint).

    python -m bench.snapshot_bench --cpu                  # the embedded demo model on the CPU (duplex_demo.yaml)
    python -m bench.snapshot_bench --gpu                  # the Mamba-2.8B shape, random bf16 weights, CUDA pool rows
    python -m bench.snapshot_bench --gpu --tiny           # the GPU script's path on a tiny model (checks the script)

Each run drives a session until it has both branches live (a user turn open while a reply runs: the largest
snapshot), then measures, as medians over ``--repeats``:

* ``fingerprint_ms``: hashing the model's identity and weight sample (once per engine; a server caches it);
* ``snapshot_ms``: ``snapshot(session, path, fingerprint=...)``: states to the host, checksum, atomic write + fsync;
* ``restore_ms``: ``restore(engine, path, fingerprint=...)``: read, checksum, checks, states into new branches
  (pool rows on the GPU), then the restored session is closed;
* ``file_bytes`` and ``state_bytes`` (the branches' conv + SSM tensors).

Results go to bench/results/snapshot_<where>.json (``--output`` to change).
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

import torch

from bench.common import build_random, environment, mamba_config, synchronize, write_json
from duplex import snapshot as snap

ROOT = pathlib.Path(__file__).resolve().parents[1]


def median_ms(fn, repeats: int, device: torch.device, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def two_branch_session(engine, speech: list[torch.Tensor], limit: int = 60):
    """A session with a reply running and a user turn open (speech while speaking; silence forces a reply)."""
    session = engine.new_session()
    for i in range(limit):
        if session.listening and session.speaking:
            return session
        session.feed(None if session.listening and not session.speaking else speech[i % len(speech)])
    raise RuntimeError(f"snapshot_bench: no user turn open during a reply after {limit} slices; try another seed.")


def measure(engine, session, repeats: int, folder: pathlib.Path) -> dict:
    device = engine.runtime.device
    started = time.perf_counter()
    fingerprint = snap.engine_fingerprint(engine)
    synchronize(device)
    cold = (time.perf_counter() - started) * 1e3
    path = folder / "session.snap"

    def restore_and_close():
        snap.restore(engine, path, fingerprint=fingerprint).close()

    results = {
        "fingerprint_first_ms": cold,
        "fingerprint_ms": median_ms(lambda: snap.engine_fingerprint(engine), repeats, device),
        "snapshot_ms": median_ms(lambda: snap.snapshot(session, path, fingerprint=fingerprint), repeats, device),
        "restore_ms": median_ms(restore_and_close, repeats, device),
    }
    branches = [b for b in (session._speaker, session._listener) if b is not None]
    results.update(file_bytes=path.stat().st_size, state_bytes=sum(b.state.nbytes for b in branches),
                   branches=len(branches), slices_played=session._slice_index,
                   tokens_per_branch=[b.state.seqlen[0] for b in branches])
    return results


def cpu_demo(repeats: int, folder: pathlib.Path) -> dict:
    from duplex.engine import load_engine, slice_audio
    from src.audio import load_audio

    engine = load_engine(ROOT / "duplex" / "duplex_demo.yaml")
    speech = [piece for name in ("question_capital", "incomplete_capital", "ignore_dinner")
              for piece in slice_audio(load_audio(ROOT / "example" / f"{name}.wav"))]
    session = two_branch_session(engine, speech)
    return {"model": "embedded demo model (duplex/duplex_demo.yaml, fp32, CPU)", **measure(engine, session, repeats,
                                                                                            folder)}


def gpu_shape(tiny: bool, repeats: int, folder: pathlib.Path, rows: int) -> dict:
    from duplex.engine import Engine, make_runtime
    from duplex.session import DuplexConfig
    from modules.tokenizer import load_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not tiny:
        raise SystemExit("snapshot_bench --gpu: no CUDA GPU found (add --tiny to check the script on the CPU).")
    from transformers import MambaForCausalLM

    shape = mamba_config(tiny)
    shape.vocab_size = mamba_config(False).vocab_size  # the duplex tokenizer's ids, tiny or not
    lm = build_random(MambaForCausalLM, shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    runtime = make_runtime(lm, device, state_rows=rows)
    hidden = lm.config.hidden_size
    noise = torch.Generator(device=device).manual_seed(0)

    def encode(wav):  # (N,) -> (1, N // 3200, H): random speech embeddings of the slice's length
        return torch.randn(1, max(1, wav.numel() // 3200), hidden, device=device, generator=noise,
                           dtype=runtime.dtype) * 0.02

    config = DuplexConfig(seed=1, max_branch_tokens=400)
    engine = Engine(runtime, encode, load_tokenizer(), config)
    session = two_branch_session(engine, [torch.zeros(48000)])
    shape = "tiny stand-in" if tiny else "Mamba-2.8B shape (64 layers, d_model 2560)"
    return {"model": f"{shape}, random {runtime.dtype} weights, {type(runtime).__name__} on {device}",
            **measure(engine, session, repeats, folder)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--cpu", action="store_true", help="the demo model on the CPU")
    where.add_argument("--gpu", action="store_true", help="the 2.8B shape on a CUDA GPU")
    parser.add_argument("--tiny", action="store_true", help="--gpu: a tiny model (checks the script, any device)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rows", type=int, default=8, help="--gpu: state pool rows")
    parser.add_argument("--folder", help="where the snapshot file is written (default: a temporary folder)")
    parser.add_argument("--output", help="results JSON (default: bench/results/snapshot_<cpu|gpu>.json)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        folder = pathlib.Path(folder)
        result = cpu_demo(args.repeats, folder) if args.cpu else gpu_shape(args.tiny, args.repeats, folder, args.rows)
    device = torch.device("cuda" if args.gpu and torch.cuda.is_available() else "cpu")
    result.update(environment=environment(device), repeats=args.repeats, torch_threads=torch.get_num_threads())
    name = "snapshot_cpu" if args.cpu else "snapshot_gpu" + ("_tiny" if args.tiny else "")
    output = pathlib.Path(args.output) if args.output else None
    path = write_json(output.stem if output else name, result, output.parent if output else None)
    for key, value in result.items():
        if key != "environment":
            print(f"{key:>22}: {round(value, 3) if isinstance(value, float) else value}")
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
