"""Shared pieces of the benchmarks: random full-size models, timers, the bandwidth floor, environment.

Everything is built from configs with random weights directly on the device (no download), so the
benchmarks run on any CUDA GPU with one command; ``tiny=True`` gives CPU-sized stand-ins to check the
scripts themselves.
"""
from __future__ import annotations

import json
import pathlib
import platform
import statistics
import time

import torch

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def mamba_config(tiny: bool = False):
    """state-spaces/mamba-2.8b-hf's shape (vocab 50280 incl. the 3 added tokens), or a tiny stand-in."""
    from transformers import MambaConfig
    if tiny:
        return MambaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, state_size=16, conv_kernel=4,
                           expand=2, time_step_rank=8, use_bias=False, use_conv_bias=True,
                           residual_in_fp32=True, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                           pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return MambaConfig(vocab_size=50280, hidden_size=2560, num_hidden_layers=64, state_size=16, conv_kernel=4,
                       expand=2, time_step_rank=160, use_bias=False, use_conv_bias=True, residual_in_fp32=True,
                       layer_norm_epsilon=1e-5, tie_word_embeddings=True, pad_token_id=0, bos_token_id=0,
                       eos_token_id=0)


def qwen2_audio_lm_config(tiny: bool = False):
    """The LM of Qwen2-Audio-7B (Qwen-7B shape: 32 layers, 4096 wide, 32 KV heads, vocab 156032)."""
    from transformers import Qwen2Config
    if tiny:
        return Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1 << 20)
    return Qwen2Config(vocab_size=156032, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=1 << 20,
                       rope_theta=10000.0, tie_word_embeddings=False)


def build_random(model_cls, config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Instantiate ``model_cls(config)`` with random weights directly on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def build_mamba(tiny: bool, device: torch.device, dtype: torch.dtype):
    from transformers import MambaForCausalLM
    return build_random(MambaForCausalLM, mamba_config(tiny), device, dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int = 3, iters: int = 20) -> float:
    """Median wall time of ``fn()`` in ms (device-synchronised around every call)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 31) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written (GB/s)."""
    if device.type != "cuda":
        nbytes = 1 << 26
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, iters=20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def decode_bytes(model, state_bytes_per_row: int, batch: int) -> int:
    """Bytes a decode step must move: every weight once (the embedding table only as the tied LM head)
    plus each row's recurrent state read and written."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + 2 * state_bytes_per_row * batch


def environment(device: torch.device) -> dict:
    """Versions and device name recorded with every result."""
    import transformers
    import triton
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "device": str(device)}
    try:
        import mamba_ssm
        info["mamba_ssm"] = mamba_ssm.__version__
    except Exception:
        info["mamba_ssm"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info["gpu"] = None
    return info


def write_json(name: str, payload: dict, out_dir: pathlib.Path | None = None) -> pathlib.Path:
    """Write ``payload`` as ``<out_dir>/<name>.json`` (default ``bench/results``)."""
    out_dir = pathlib.Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def pick_device(tiny: bool) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not tiny:
        raise SystemExit("bench: no CUDA GPU found; full-size runs need one (use --tiny to check on CPU).")
    return torch.device("cpu")


def cuda_for_timing(tiny: bool, tool: str) -> torch.device | None:
    """The CUDA device for a tool that times kernels from CUDA graphs; None (after saying so) on CPU."""
    device = pick_device(tiny)
    if device.type != "cuda":
        print(f"{tool} needs a CUDA GPU (timings from CUDA graphs); nothing to do on CPU.")
        return None
    return device


def print_rates(name: str, rows: int, nbytes: int, bandwidth: float, times: dict[str, float]) -> None:
    """Print µs per layer and GB/s (against the copy rate ``bandwidth``) of each timed entry, best last."""
    print(f"\n== {name}, {rows} row(s)")
    for label, us in sorted(times.items(), key=lambda kv: -kv[1]):
        rate = nbytes / us / 1e3  # GB/s
        print(f"{us:8.2f} us/layer {rate:7.0f} GB/s ({rate / bandwidth:4.0%} of copy)  {label}")
