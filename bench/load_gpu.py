"""In-process load benchmark: N simulated real-time duplex conversations on one scheduler.

    python -m bench.load_gpu --out bench/results/load_gpu                 # H200: Mamba-2.8B shape, random bf16
    python -m bench.load_gpu --device cpu --tiny --sessions 4,8 --out /tmp/load   # the script itself, on CPU

Each conversation plays a script of 3 s slices: questions (answered), background talk (ignored), interruptions
during an answer, cut-off questions (incomplete, then answered on the silence after them) and silences. Slices
arrive on a schedule: conversation i's k-th slice is complete at offset_i + k * 3 s (offsets spread over the
first 3 s). The loop submits every slice that has arrived and runs one ``Scheduler.tick`` over all of them,
back to back while there is work. Idle time is skipped (a virtual clock: the arrival times are what a real-time
client would produce, the processing times are measured), so a sweep costs only the time the GPU works.

Measured per N: slice latency (slice complete -> its event out: waiting for the running tick + its own tick) p50 /
p99 / max; the real-time factor (processing time / audio time: below 1 keeps up); tick time; peak GPU memory. The
largest N with p99 <= --budget-ms is reported; results go to <out>/load_gpu.json and a plot of latency against N
to <out>/load_gpu.png.

Random weights decide nothing sensible, so the state tokens follow the script: the encoder output carries the
slice's code in one feature and the runtime overwrites the probe's logits by it (after computing them, so the
work is the real work). Replies are greedy (their token choices are one argmax per round for all sessions).
"""
from __future__ import annotations

import argparse
import collections
import json
import pathlib
import random
import statistics
import time

import torch

from bench import common
from duplex.cuda_runtime import CudaMambaRuntime
from duplex.sampling import SamplingConfig
from duplex.scheduler import Scheduler
from duplex.session import DuplexConfig, DuplexSession

SAMPLE_RATE = 16000
ROWS_PER_SESSION = 3  # speaker, listener and a probe fork inside a tick
# slice kinds: the code the encoder marks, the state token the probe is told to predict
RESPOND, IGNORE, INCOMPLETE = 1, 2, 3
# one conversation's pattern (rotated per conversation): Q question, B background talk, I interruption,
# C cut-off question, S silence
PATTERN = "QSBSISSCSSQBSS"
KIND_CODE = {"Q": RESPOND, "I": RESPOND, "B": IGNORE, "C": INCOMPLETE}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="cuda (default when available) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny model and encoder (a check of the script)")
    parser.add_argument("--sessions", default="64,128,256,512,768,1024,1280,1536,2048",
                        help="comma-separated N values to sweep (those that do not fit in memory are skipped)")
    parser.add_argument("--slices", type=int, default=10, help="slices per conversation per N")
    parser.add_argument("--slice-seconds", type=float, default=3.0)
    parser.add_argument("--budget-ms", type=float, default=300.0, help="p99 slice latency target")
    parser.add_argument("--time-limit", type=float, default=450.0,
                        help="no new N once this many seconds would pass (the lead's command limit is 600 s)")
    parser.add_argument("--max-branch-tokens", type=int, default=256)
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "load_gpu"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- scripted decisions
class CodedEncoder:
    """The speech encoder, then the slice's code (its first sample * 100) written into feature 0 of every
    position, so the probe can be told what the script wants."""

    def __init__(self, inner):
        self.inner = inner

    def encode_wav(self, wav: torch.Tensor) -> torch.Tensor:
        return self._mark(self.inner(wav), wav[None])

    __call__ = encode_wav

    def encode_batch(self, wavs: torch.Tensor) -> torch.Tensor:
        return self._mark(self.inner.encode_batch(wavs), wavs)

    @staticmethod
    def _mark(speech: torch.Tensor, wavs: torch.Tensor) -> torch.Tensor:
        codes = torch.round(wavs[:, 0].float() * 100).to(device=speech.device, dtype=speech.dtype)  # (B,)
        speech[:, :, 0] = codes[:, None]
        return speech  # (B, P, H)


class CodedProbeRuntime(CudaMambaRuntime):
    """The GPU backend; a probe's logits (computed as always) are then replaced by the scripted state token."""

    def __init__(self, hf_model, state_ids: dict[int, int], **kwargs):
        super().__init__(hf_model, **kwargs)
        table = torch.zeros(max(state_ids) + 1, dtype=torch.long)
        for code, token in state_ids.items():
            table[code] = token
        self.answer = table.to(self.device)

    def prefill_many(self, states, chunks, fork_at=None):
        logits, forks = super().prefill_many(states, chunks, fork_at)
        forked = [i for i, at in enumerate(fork_at or []) if at is not None]
        if forked:
            codes = torch.stack([chunks[i][fork_at[i] - 1, 0] for i in forked]).round().long()  # (F,) on device
            rows = torch.tensor(forked, device=logits.device)
            logits[rows] = -1e4
            logits[rows, self.answer[codes.clamp(0, self.answer.numel() - 1)]] = 0.0
        return logits, forks


def warm_up_graphs(runtime) -> float:
    """Capture the CUDA graphs a run can use (decode steps and forking prefills per rows bucket and length
    bucket) before anything is timed; a capture inside a timed tick would show as a latency spike. Seconds."""
    from duplex.cuda_runtime import GRAPH_BUCKETS, LENGTH_BUCKETS
    if not runtime.use_graphs:
        return 0.0
    start = time.perf_counter()
    hidden = runtime.config.hidden_size
    for bucket in [b for b in GRAPH_BUCKETS if 2 * b <= runtime.free_rows]:
        states = [runtime.new_state(1) for _ in range(bucket)]
        runtime.step_many(states, torch.zeros(bucket, 1, hidden, device=runtime.device))
        for length in LENGTH_BUCKETS:
            chunks = [torch.zeros(length, hidden, device=runtime.device)] * bucket
            _, forks = runtime.prefill_many(states, chunks, [length - 1] * bucket)
            runtime.release_many(forks)
        runtime.release_many(states)
    common.synchronize(runtime.device)
    return time.perf_counter() - start


def conversation(index: int, slices: int) -> list[str]:
    shift = index % len(PATTERN)
    pattern = PATTERN[shift:] + PATTERN[:shift]
    return [pattern[k % len(pattern)] for k in range(slices)]


def slice_audio_of(kind: str, slice_seconds: float, generator: torch.Generator) -> torch.Tensor | None:
    if kind == "S":
        return None
    wav = torch.randn(int(slice_seconds * SAMPLE_RATE), generator=generator) * 0.1  # (N,)
    wav[0] = KIND_CODE[kind] / 100
    return wav


# ---------------------------------------------------------------------------------------------- the model
def build(args, device: torch.device):
    from modules.speech import build_speech_encoder
    from modules.tokenizer import load_tokenizer
    from transformers import MambaForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = common.mamba_config(args.tiny)
    config.vocab_size = 50280  # the real tokenizer's ids (state tokens 50277-50279)
    lm = common.build_random(MambaForCausalLM, config, device, dtype)
    kwargs = dict(d_model=16, num_layers=1, d_ffn=32, kernel_size=3, d_state=4, adapter_hidden=8) if args.tiny \
        else {}
    torch.manual_seed(0)
    encoder = build_speech_encoder(lm_dim=config.hidden_size, **kwargs).to(device).eval()
    tokenizer = load_tokenizer(num_state_tokens=3)
    return lm, encoder, tokenizer


def make_encode(encoder, device, dtype, slice_seconds):
    if device.type == "cuda":
        from duplex.cuda_encoder import GraphedSpeechEncoder
        return CodedEncoder(GraphedSpeechEncoder(encoder, int(slice_seconds * SAMPLE_RATE), dtype=dtype))
    from duplex.engine import _WavEncoder
    return CodedEncoder(_WavEncoder(encoder, device))


def state_bytes_per_row(lm) -> int:
    config = lm.config
    d_inner = config.expand * config.hidden_size
    conv = config.num_hidden_layers * d_inner * config.conv_kernel * lm.lm_head.weight.element_size()
    return conv + config.num_hidden_layers * d_inner * config.state_size * 4


def sessions_that_fit(lm, device, wanted: list[int], reserve_gib: float) -> list[int]:
    if device.type != "cuda":
        return wanted
    free = torch.cuda.mem_get_info(device)[0] - reserve_gib * 2**30
    limit = int(free // (ROWS_PER_SESSION * state_bytes_per_row(lm)))
    return [n for n in wanted if n <= limit]


# ---------------------------------------------------------------------------------------------- one run
def simulate(scheduler, engine_parts, n_sessions: int, slices: int, args, rng: random.Random) -> dict:
    """N conversations in virtual real time; returns latency / tick / memory figures."""
    runtime, tokenizer, config = engine_parts
    generator = torch.Generator().manual_seed(args.seed)
    audio = {kind: slice_audio_of(kind, args.slice_seconds, generator) for kind in "QBICS"}
    sessions = [DuplexSession(runtime, scheduler.encode, tokenizer, config) for _ in range(n_sessions)]
    for session in sessions:
        scheduler.add(session)
    arrivals = []
    for index, session in enumerate(sessions):
        offset = rng.uniform(0.0, args.slice_seconds)
        for k, kind in enumerate(conversation(index, slices)):
            arrivals.append((offset + (k + 1) * args.slice_seconds, index, kind))
    arrivals.sort()
    submitted = collections.defaultdict(collections.deque)  # session index -> arrival times of its open slices
    index_of = {id(s): i for i, s in enumerate(sessions)}
    latencies, ticks = [], []
    clock, busy, next_arrival = 0.0, 0.0, 0
    rounds_before = scheduler.rounds
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
    wall_start = time.perf_counter()
    while next_arrival < len(arrivals) or scheduler.has_work():
        while next_arrival < len(arrivals) and arrivals[next_arrival][0] <= clock:
            arrived, index, kind = arrivals[next_arrival]
            scheduler.submit(sessions[index], audio[kind])
            submitted[index].append(arrived)
            next_arrival += 1
        if not scheduler.has_work():
            clock = arrivals[next_arrival][0]  # idle until the next slice is complete
            continue
        start = time.perf_counter()
        out = scheduler.tick()
        common.synchronize(runtime.device)
        spent = time.perf_counter() - start
        clock += spent
        busy += spent
        ticks.append(spent * 1e3)
        for session, event in out:
            latencies.append((clock - submitted[index_of[id(session)]].popleft()) * 1e3)
    wall = time.perf_counter() - wall_start
    changes = collections.Counter(c for s in sessions for t in s.transcript for c in [t.status])
    for session in sessions:
        scheduler.remove(session)
    audio_seconds = arrivals[-1][0] if arrivals else 0.0
    latencies.sort()
    return {
        "sessions": n_sessions, "slices": len(latencies), "audio_s": round(audio_seconds, 2),
        "latency_p50_ms": round(statistics.median(latencies), 1),
        "latency_p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
        "latency_max_ms": round(latencies[-1], 1),
        "real_time_factor": round(busy / audio_seconds, 3) if audio_seconds else None,
        "ticks": len(ticks), "tick_p50_ms": round(statistics.median(ticks), 1), "tick_max_ms": round(max(ticks), 1),
        "rounds_per_tick": round((scheduler.rounds - rounds_before) / max(1, len(ticks)), 1),
        "wall_s": round(wall, 1), "turns": dict(changes),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(runtime.device) / 2**30, 2)
        if runtime.device.type == "cuda" else None,
    }


def plot(rows: list[dict], budget_ms: float, path: pathlib.Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ns = [r["sessions"] for r in rows]
    ax.plot(ns, [r["latency_p50_ms"] for r in rows], "o-", label="p50 slice latency")
    ax.plot(ns, [r["latency_p99_ms"] for r in rows], "s-", label="p99 slice latency")
    ax.axhline(budget_ms, color="red", linestyle="--", label=f"budget {budget_ms:.0f} ms")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent real-time conversations (N)")
    ax.set_ylabel("slice complete -> events out (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device) if args.device else common.pick_device(args.tiny)
    lm, encoder, tokenizer = build(args, device)
    wanted = sorted(int(n) for n in args.sessions.split(","))
    fitting = sessions_that_fit(lm, device, wanted, reserve_gib=16.0)
    if not fitting:
        raise SystemExit(f"load_gpu: none of N = {wanted} fits in GPU memory ({ROWS_PER_SESSION} state rows each).")
    from duplex.session import TurnPrompts, TurnTokens
    tokens = TurnTokens.from_tokenizer(tokenizer, TurnPrompts.default())
    runtime = CodedProbeRuntime(lm, {RESPOND: tokens.respond, IGNORE: tokens.ignore, INCOMPLETE: tokens.incomplete},
                                max_rows=ROWS_PER_SESSION * max(fitting) + 1,
                                **({} if device.type == "cuda" else {"kernels": "torch"}))
    greedy = SamplingConfig(greedy=True)
    config = DuplexConfig(slice_seconds=args.slice_seconds, state_sampling=greedy, reply_sampling=greedy,
                          max_branch_tokens=args.max_branch_tokens, seed=args.seed)
    encode = make_encode(encoder, device, lm.lm_head.weight.dtype, args.slice_seconds)
    scheduler = Scheduler(runtime, encode)
    parts = (runtime, tokenizer, config)
    rng = random.Random(args.seed)
    setup_s = time.perf_counter() - started
    graphs_s = warm_up_graphs(runtime)
    warm = simulate(scheduler, parts, min(fitting[-1], 128), 3, args, rng)  # encoder shapes, allocator
    print(f"setup {setup_s:.0f} s, graphs {graphs_s:.0f} s, warm-up run ({warm['sessions']} sessions) "
          f"{warm['wall_s']} s", flush=True)
    rows, last_wall, last_n = [], warm["wall_s"], warm["sessions"]
    for n in fitting:
        elapsed = time.perf_counter() - started
        if elapsed + last_wall * n / last_n * 1.3 > args.time_limit:
            print(f"N = {n}: skipped, the time limit ({args.time_limit:.0f} s) would pass", flush=True)
            break
        row = simulate(scheduler, parts, n, args.slices, args, rng)
        rows.append(row)
        last_wall, last_n = max(row["wall_s"], 1e-3), n
        print(json.dumps(row), flush=True)
    within = [r["sessions"] for r in rows if r["latency_p99_ms"] <= args.budget_ms]
    env = common.environment(device)
    result = {
        "environment": env, "model": "tiny" if args.tiny else "mamba-2.8b shape, random weights",
        "dtype": str(lm.lm_head.weight.dtype), "slice_seconds": args.slice_seconds,
        "slices_per_session": args.slices, "budget_ms": args.budget_ms, "pattern": PATTERN,
        "skipped_not_fitting": [n for n in wanted if n not in fitting],
        "state_mib_per_row": round(state_bytes_per_row(lm) / 2**20, 2),
        "largest_n_within_budget": max(within) if within else None, "runs": rows, "warm_up": warm,
        "setup_s": round(setup_s, 1), "graph_capture_s": round(graphs_s, 1),
        "command": "python -m bench.load_gpu " + " ".join(argv if argv is not None else []),
        "total_s": round(time.perf_counter() - started, 1),
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    title = f"{env.get('gpu') or 'CPU'}: {result['model']}, {args.slice_seconds:g} s slices"
    if rows:
        plot(rows, args.budget_ms, out / "load_gpu.png", title)
    print(f"largest N with p99 <= {args.budget_ms:.0f} ms: {result['largest_n_within_budget']}; "
          f"results in {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
