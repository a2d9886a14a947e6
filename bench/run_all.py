"""All DuplexMamba speed and memory benchmarks in one run, one table, one JSON.

Builds the full-size LM (mamba-2.8b-hf shape, random bf16 weights, fp32 SSM state) and the full-size
speech encoder on the GPU and measures, in the same process:

* the device-to-device copy bandwidth and, from it, the decode floor (all weights read once per step);
* decode ms/token at batch 1, 2, 8, 64: our runtime (each kernel set available) and transformers
  ``generate`` on the same weights; ratios to the floor;
* fork (branch copy) time; the encoder for a 3 s slice; the duplex per-slice cost
  (encode + prefill + state-token probe + 4 reply tokens) and its real-time factor;
* memory versus context length (paper Fig. 4): our LM streaming 1k..64k tokens against a
  Transformer of the Qwen2-Audio LM's shape (random weights, transformers, SDPA) until it runs out
  of memory; a PNG plot.

Usage::

    python bench/run_all.py                       # CUDA GPU, full size (~5 min on an H100)
    python bench/run_all.py --tiny                # CPU check of the script itself (tiny models)
    python bench/run_all.py --out DIR --plot docs/memory_vs_context.png
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import pathlib
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from duplex.cuda_runtime import CudaMambaRuntime, _mamba_ssm_state_update  # noqa: E402

SLICE_SECONDS = 3.0
ENDOFSPEECH_TOKENS = 6  # "<|endofspeech|>" in the GPT-NeoX-20B tokenizer
REPLY_TOKENS = 4  # N_ahead of the reference duplex loop


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models (runs on CPU) to check the script")
    parser.add_argument("--out", type=pathlib.Path, default=common.RESULTS_DIR, help="folder for the JSON")
    parser.add_argument("--plot", type=pathlib.Path, default=None, help="PNG path for the memory plot")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 8, 64])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="compare the default runtime with these instead of the built-in variants, e.g. "
                             "'conv32={\"fused_tiles\": {\"2\": {\"conv\": {\"block_d\": 32}}}}' (CudaMambaRuntime "
                             "keyword arguments; repeatable)")
    parser.add_argument("--hf-tokens", type=int, default=16, help="tokens per transformers generate timing")
    parser.add_argument("--skip", nargs="*", default=[], choices=["hf", "memory", "encoder", "transformer"],
                        help="sections to leave out")
    parser.add_argument("--max-context-log2", type=int, default=16, help="longest context 2**N for the Mamba LM")
    parser.add_argument("--transformer-max-log2", type=int, default=17, help="longest context for the Transformer")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- decode
def greedy_decode_ms(runtime, batch: int, steps: int, device) -> float:
    """ms per decode step of ``batch`` branches (argmax -> embed -> step), prompt already prefilled."""
    state = runtime.new_state(batch)
    ids = torch.randint(0, runtime.config.vocab_size, (batch, 8), device=device)
    logits = runtime.prefill(state, runtime.embed(ids))

    def run():
        nonlocal logits
        for _ in range(steps):
            logits = runtime.step(state, runtime.embed(logits.argmax(-1, keepdim=True)))

    ms = common.time_ms(run, device, warmup=2, iters=5) / steps
    runtime.release(state)
    return ms


def hf_generate_ms(model, batch: int, new_tokens: int, device) -> float:
    """ms per token of transformers ``generate`` (greedy): (t(1 + n tokens) - t(1 token)) / n."""
    ids = torch.randint(1, model.config.vocab_size, (batch, 8), device=device)

    def gen(n):
        return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=0, use_cache=True)

    one = common.time_ms(gen(1), device, warmup=1, iters=3)
    many = common.time_ms(gen(1 + new_tokens), device, warmup=1, iters=3)
    return (many - one) / new_tokens


def runtime_variants(device) -> dict[str, dict]:
    """The runtime configurations compared, the default first: "fused" decode (4 launches per layer,
    PDL on sm_90+, up to 2 rows; cuda_kernels.FUSED_DECODE_TILES), the same for 1 row only and without
    PDL; the "split" path (5-7 launches per layer, per-shape cuBLAS or our skinny GEMM) with our scans,
    on cuBLAS only, with a dt_proj GEMM and the chunks' scan instead of the row-block scan for more than
    2 rows and, when installed, with mamba-ssm's ``selective_state_update``. (Tile variants compared in
    earlier runs are in docs/performance.md; ``--variant`` runs others.)"""
    if device.type != "cuda":
        return {"torch": {"kernels": "torch"}}
    variants = {"fused": {"kernels": "triton", "decode": "fused"},
                "fused_1row": {"kernels": "triton", "decode": "fused", "fused_max_rows": 1},
                "fused_nopdl": {"kernels": "triton", "decode": "fused", "pdl": False},
                "split": {"kernels": "triton", "decode": "split"},
                "split_cublas": {"kernels": "triton", "decode": "split", "linear": "cublas"},
                "split_dt_gemm": {"kernels": "triton", "decode": "split", "split_tiles": {"scan": False}}}
    if _mamba_ssm_state_update() is not None:
        variants["split_mamba_ssm"] = {"kernels": "mamba_ssm", "decode": "split"}
    return variants


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME=JSON`` -> (name, CudaMambaRuntime options; fused_tiles' row counts as ints)."""
    name, _, spec = text.partition("=")
    try:
        options = json.loads(spec)
    except json.JSONDecodeError as err:
        raise SystemExit(f"run_all: --variant {text!r}: not NAME=JSON ({err}).") from err
    if "fused_tiles" in options:
        options["fused_tiles"] = {int(rows): tiles for rows, tiles in options["fused_tiles"].items()}
    return name, {"kernels": "triton", "decode": "fused", **options}


def bench_decode(model, runtimes: dict, args, device, bandwidth) -> list[dict]:
    state_row = runtimes[next(iter(runtimes))].pool.row(0).nbytes
    rows = []
    for batch in tqdm(args.batches, desc="decode"):
        row = {"batch": batch, "floor_ms": common.decode_bytes(model, state_row, batch) / (bandwidth * 1e9) * 1e3}
        for name, rt in runtimes.items():
            row[f"ours_{name}_ms"] = greedy_decode_ms(rt, batch, 8 if args.tiny else 64, device)
        if "hf" not in args.skip:
            row["hf_generate_ms"] = hf_generate_ms(model, batch, args.hf_tokens, device)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- duplex
def bench_fork(runtime, device) -> dict:
    """Branch copy: ``fork`` (allocate pool rows + one copy_ per kind) and a bare ``copy_`` rollback."""
    main = runtime.new_state(1)
    probe = runtime.new_state(1)
    n = 200

    def forks():
        for _ in range(n):
            runtime.release(runtime.fork(main))

    def copies():
        for _ in range(n):
            probe.copy_(main)

    result = {"fork_us": common.time_ms(forks, device, iters=5) / n * 1e3,
              "copy_us": common.time_ms(copies, device, iters=5) / n * 1e3,
              "state_mib": main.nbytes / 2**20}
    runtime.release(main)
    runtime.release(probe)
    return result


def build_encoder(tiny: bool, device):
    from modules.speech import build_speech_encoder
    kwargs = dict(d_model=16, num_layers=1, d_ffn=32, kernel_size=3, d_state=4, adapter_hidden=8, lm_dim=64) \
        if tiny else {}
    torch.manual_seed(0)
    return build_speech_encoder(**kwargs).to(device).eval()


def bench_encoder(encoder, device) -> tuple[dict, object]:
    """3 s slice through CNN + ConMamba + adapter: eager fp32, eager bf16 autocast, CUDA graph with autocast
    casting the weights on every call, CUDA graph with the weights converted to bf16 once (the engine's)."""
    from duplex.cuda_encoder import GraphedSpeechEncoder
    wav = torch.randn(int(16000 * SLICE_SECONDS), device=device) * 0.1
    with torch.no_grad():
        result = {"encoder_eager_fp32_ms": common.time_ms(lambda: encoder.encode_wav(wav), device)}
        ref = encoder.encode_wav(wav).float()  # before any weight is converted
    eager = GraphedSpeechEncoder(encoder, wav.numel(), use_graph=False, cast_weights=False)
    result["encoder_eager_bf16_ms"] = common.time_ms(lambda: eager(wav), device)
    autocast = GraphedSpeechEncoder(encoder, wav.numel(), use_graph=True, cast_weights=False)
    result["encoder_graph_autocast_ms"] = common.time_ms(lambda: autocast(wav), device)
    graphed = GraphedSpeechEncoder(encoder, wav.numel(), use_graph=True)  # converts the weights in place
    result["encoder_graphed"] = graphed.graphed
    result["encoder_graphed_features"] = graphed.graphed_features
    result["encoder_graph_ms"] = common.time_ms(lambda: graphed(wav), device)
    result["encoder_bf16_rel_err"] = float((graphed(wav).float() - ref).norm() / ref.norm())
    result["speech_positions"] = int(ref.shape[1])
    return result, graphed


def duplex_slice_ms(runtime, encode, device) -> dict:
    """One duplex step for a 3 s slice while the model is replying, as the session runs it: encode the
    slice; in one pass over the weights add it to the listening branch, probe the state token on a fork
    (speech + "<|endofspeech|>") and feed the replying branch its next token (``prefill_fork_and_step``);
    then the other ``REPLY_TOKENS`` - 1 reply tokens. The older two- and three-pass variants are timed too."""
    vocab = runtime.config.vocab_size
    main, reply = runtime.new_state(1), runtime.new_state(1)
    runtime.prefill(main, runtime.embed(torch.randint(0, vocab, (1, 23), device=device)))
    last = runtime.prefill(reply, runtime.embed(torch.randint(0, vocab, (1, 23), device=device)))
    wav = torch.randn(int(16000 * SLICE_SECONDS), device=device) * 0.1
    marker = runtime.embed(torch.randint(0, vocab, (1, ENDOFSPEECH_TOKENS), device=device))

    def chunk(speech):
        return torch.cat([speech.to(marker.dtype), marker], 1)  # (1, P + E, H)

    def next_token():
        return runtime.embed(last.argmax(-1, keepdim=True))  # (1, 1, H)

    def listen_and_step(speech):
        nonlocal last
        probe, logits, last = runtime.prefill_fork_and_step(main, chunk(speech), speech.shape[1], reply,
                                                            next_token())
        runtime.release(probe)
        return logits.argmax(-1)

    def listen(speech):  # without the reply token
        probe, logits = runtime.prefill_and_fork(main, chunk(speech), speech.shape[1])
        runtime.release(probe)
        return logits.argmax(-1)

    def step():
        nonlocal last
        listen_and_step(encode(wav))
        for _ in range(REPLY_TOKENS - 1):
            last = runtime.step(reply, next_token())

    ms = common.time_ms(step, device, warmup=3, iters=20)
    speech = encode(wav)

    def separate():  # prefill, fork (copy), probe prefill
        runtime.prefill(main, speech.to(runtime.dtype))
        probe = runtime.fork(main)
        runtime.prefill(probe, marker)
        runtime.release(probe)

    parts = {"slice_encode_ms": common.time_ms(lambda: encode(wav), device),
             "slice_listen_probe_step_ms": common.time_ms(lambda: listen_and_step(speech), device),
             "slice_listen_probe_ms": common.time_ms(lambda: listen(speech), device),
             "slice_prefill_then_probe_ms": common.time_ms(separate, device),
             "slice_reply_token_ms": common.time_ms(lambda: runtime.step(reply, next_token()), device)}
    for s in (main, reply):
        runtime.release(s)
    return {"duplex_slice_ms": ms, "duplex_rtf": ms / (SLICE_SECONDS * 1e3), **parts}


def pass_ms_by_variant(runtimes: dict, encode, device) -> dict:
    """The duplex step's one pass (``prefill_fork_and_step``: a 3 s slice's speech and the
    ``<|endofspeech|>`` probe on the listener, the reply's next token as a second row) for each runtime
    variant: the pass runs the split path's kernels, so this compares their linear-layer and PDL choices."""
    speech = encode(torch.randn(int(16000 * SLICE_SECONDS), device=device) * 0.1)
    result = {}
    for name, rt in runtimes.items():
        vocab = rt.config.vocab_size
        main, reply = rt.new_state(1), rt.new_state(1)
        rt.prefill(main, rt.embed(torch.randint(0, vocab, (1, 23), device=device)))
        marker = rt.embed(torch.randint(0, vocab, (1, ENDOFSPEECH_TOKENS), device=device))
        chunk = torch.cat([speech.to(marker.dtype), marker], 1)  # (1, P + E, H)
        token = rt.embed(torch.randint(0, vocab, (1, 1), device=device))

        def one_pass():
            probe, _, _ = rt.prefill_fork_and_step(main, chunk, speech.shape[1], reply, token)
            rt.release(probe)

        result[name] = common.time_ms(one_pass, device)
        for s in (main, reply):
            rt.release(s)
    return result


# ---------------------------------------------------------------------------------------------- memory
def mamba_memory_gib(runtime, context: int, device, chunk: int) -> float:
    """Peak memory while streaming ``context`` tokens into one state (chunked prefill) and decoding 4."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    state = runtime.new_state(1)
    vocab = runtime.config.vocab_size
    logits = None
    for start in range(0, context, chunk):
        ids = torch.randint(0, vocab, (1, min(chunk, context - start)), device=device)
        logits = runtime.prefill(state, runtime.embed(ids))
    for _ in range(4):
        logits = runtime.step(state, runtime.embed(logits.argmax(-1, keepdim=True)))
    torch.cuda.synchronize(device)
    runtime.release(state)
    return torch.cuda.max_memory_allocated(device) / 2**30


def transformer_memory_gib(model, context: int, device) -> float | None:
    """Peak memory of transformers' prefill of ``context`` tokens (KV cache, SDPA) + 4 decode steps;
    None when it runs out of memory."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        for _ in range(4):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        torch.cuda.synchronize(device)
        del out, cache, ids
    except torch.OutOfMemoryError:
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def bench_memory_mamba(runtime, args, device) -> list[dict]:
    chunk = 64 if args.tiny else 1024
    lengths = [2**k for k in range(6 if args.tiny else 10, args.max_context_log2 + 1)]
    return [{"context": n, "mamba_gib": mamba_memory_gib(runtime, n, device, chunk)}
            for n in tqdm(lengths, desc="memory (Mamba)")]


def bench_memory_transformer(args, device) -> list[dict]:
    from transformers import Qwen2ForCausalLM
    model = common.build_random(Qwen2ForCausalLM, common.qwen2_audio_lm_config(args.tiny), device,
                                torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    rows = []
    lengths = [2**k for k in range(6 if args.tiny else 10, args.transformer_max_log2 + 1)]
    for n in tqdm(lengths, desc="memory (Transformer)"):
        gib = transformer_memory_gib(model, n, device)
        rows.append({"context": n, "transformer_gib": gib})
        if gib is None:
            break
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def plot_memory(mamba_rows, transformer_rows, path: pathlib.Path, gpu: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["context"] for r in mamba_rows], [r["mamba_gib"] for r in mamba_rows], "o-",
            label="DuplexMamba LM (Mamba-2.8B, this runtime)")
    ok = [r for r in transformer_rows if r["transformer_gib"] is not None]
    ax.plot([r["context"] for r in ok], [r["transformer_gib"] for r in ok], "s-",
            label="Qwen2-Audio LM shape (7B, transformers SDPA)")
    oom = [r["context"] for r in transformer_rows if r["transformer_gib"] is None]
    if oom:
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        ax.plot(oom, [total] * len(oom), "rx", markersize=12, label="out of memory")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("peak GPU memory (GiB)")
    ax.set_title(f"Memory vs context, bf16, {gpu}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------- report
def print_table(results: dict) -> None:
    env = results["environment"]
    print(f"\n== DuplexMamba benchmarks: {env.get('gpu') or 'CPU'}, torch {env['torch']}, transformers "
          f"{env['transformers']}, triton {env['triton']}, mamba_ssm {env['mamba_ssm']}")
    print(f"copy bandwidth {results['copy_bandwidth_gbs']:.0f} GB/s (read + write)")
    kernels = [k[5:-3] for k in results["decode"][0] if k.startswith("ours_")]
    head = f"{'batch':>5} {'floor ms':>9} " + " ".join(f"{k + ' ms':>16}" for k in kernels) \
        + f" {'x floor':>8} {'HF gen ms':>10} {'HF/ours':>8}"
    print(head)
    for row in results["decode"]:
        best = min(row[f"ours_{k}_ms"] for k in kernels)
        line = f"{row['batch']:>5} {row['floor_ms']:>9.3f} " + " ".join(
            f"{row[f'ours_{k}_ms']:>16.3f}" for k in kernels) + f" {best / row['floor_ms']:>8.2f}"
        if "hf_generate_ms" in row:
            line += f" {row['hf_generate_ms']:>10.2f} {row['hf_generate_ms'] / best:>8.1f}"
        print(line)
    for key in ("fork_us", "copy_us", "state_mib", "encoder_eager_fp32_ms", "encoder_eager_bf16_ms",
                "encoder_graph_autocast_ms", "encoder_graph_ms", "encoder_graphed", "encoder_graphed_features",
                "encoder_bf16_rel_err",
                "duplex_slice_ms", "duplex_rtf",
                "slice_encode_ms", "slice_listen_probe_step_ms", "slice_listen_probe_ms", "slice_prefill_then_probe_ms",
                "slice_reply_token_ms", "slice_pass_ms_by_variant",
                "linear_choice"):
        if key in results:
            value = results[key]
            print(f"{key:>24}: {value:.4g}" if isinstance(value, float) else f"{key:>24}: {value}")
    for row in results.get("memory", []):
        t = row.get("transformer_gib")
        m = row.get("mamba_gib")
        print(f"context {row['context']:>7}: Mamba {'-' if m is None else f'{m:.2f}'} GiB, "
              f"Transformer {'OOM' if 'transformer_gib' in row and t is None else ('-' if t is None else f'{t:.2f}')}"
              " GiB")


def merge_memory(mamba_rows, transformer_rows) -> list[dict]:
    by_context = {}
    for row in mamba_rows + transformer_rows:
        by_context.setdefault(row["context"], {"context": row["context"]}).update(row)
    return [by_context[k] for k in sorted(by_context)]


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = common.pick_device(args.tiny)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = {"environment": common.environment(device), "date": datetime.datetime.now(datetime.UTC).isoformat(),
               "command": " ".join(["python", "bench/run_all.py", *sys.argv[1:]]), "tiny": args.tiny}
    results["copy_bandwidth_gbs"] = common.copy_bandwidth_gbs(device)
    model = common.build_mamba(args.tiny, device, dtype)
    rows = max(args.batches) + 8
    variants = runtime_variants(device)
    if args.variant and device.type == "cuda":
        variants = {"fused": variants["fused"], **dict(parse_variant(v) for v in args.variant)}
    runtimes = {name: CudaMambaRuntime(model, max_rows=rows, **options) for name, options in variants.items()}
    best = runtimes[next(iter(runtimes))]  # the default configuration
    results["linear_choice"] = {k: rt.linear_choice for k, rt in runtimes.items()}
    results["decode"] = bench_decode(model, runtimes, args, device, results["copy_bandwidth_gbs"])
    results.update(bench_fork(best, device))
    if "encoder" not in args.skip:
        encoder = build_encoder(args.tiny, device)
        enc_result, graphed = bench_encoder(encoder, device)
        results.update(enc_result)
        results.update(duplex_slice_ms(best, graphed, device))
        results["slice_pass_ms_by_variant"] = pass_ms_by_variant(runtimes, graphed, device)
        del encoder, graphed
    if device.type == "cuda" and "memory" not in args.skip:
        runtimes = {"best": best}  # only one pool and its graphs stay allocated
        gc.collect()
        torch.cuda.empty_cache()
        mamba_rows = bench_memory_mamba(best, args, device)
        del runtimes, best, model
        gc.collect()
        torch.cuda.empty_cache()
        transformer_rows = [] if "transformer" in args.skip else bench_memory_transformer(args, device)
        results["memory"] = merge_memory(mamba_rows, transformer_rows)
        if args.plot:
            plot_memory(mamba_rows, transformer_rows, args.plot, results["environment"]["gpu"])
    print_table(results)
    name = "tiny_cpu" if args.tiny and device.type != "cuda" else \
        f"{(results['environment']['gpu'] or 'cpu').replace(' ', '_')}{'_tiny' if args.tiny else ''}"
    print("wrote", common.write_json(name, results, args.out))


if __name__ == "__main__":
    main()
