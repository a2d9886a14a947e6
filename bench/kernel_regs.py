"""Registers, spills and shared memory of the GPU kernels, compiled for an H100 (sm_90a) on any machine.

Why: a Triton kernel that holds a weight tile in registers is fast only while it neither spills nor
drops to one or two programs per SM, and both are decided by the compiler, not the GPU. This script
swaps Triton's driver for one that only names the target, lets the wrappers of
``duplex/cuda_kernels.py`` specialise and compile each kernel exactly as a launch would (same
constexprs, same 16-byte divisibility of pointers and sizes), runs ``ptxas -v`` on the PTX and prints
what it reports. No GPU, no CUDA driver; Triton's wheel ships ptxas.

Usage::

    python bench/kernel_regs.py [--rows 1 2]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from duplex import cuda_kernels  # noqa: E402

HOPPER = ("cuda", 90, 32)


class _TargetOnlyDriver:
    """What Triton's JIT asks of a driver to compile (never to launch): the target and a device id."""

    def __init__(self, target):
        self._target = target

    def get_current_target(self):
        return self._target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class compile_only:
    """Context: Triton kernels launched inside are compiled for ``target`` (not run) and collected."""

    def __init__(self, target=HOPPER):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget(*target)
        self.compiled: list = []

    def __enter__(self):
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction
        if cuda_kernels.interpreting():
            raise RuntimeError("kernel_regs: unset TRITON_INTERPRET (the interpreter compiles nothing).")
        self._driver, self._run = driver._active, JITFunction.run  # None: none chosen yet
        driver.set_active(_TargetOnlyDriver(self.target))
        original, compiled = self._run, self.compiled

        def run(fn, *args, grid, warmup, **kwargs):
            kernel = original(fn, *args, grid=grid, warmup=True, **kwargs)
            compiled.append((fn.fn.__name__, kernel))
            return kernel

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction
        JITFunction.run = self._run
        driver._active = self._driver
        return False


def ptxas_usage(kernel, arch: str = "sm_90a") -> dict:
    """{"registers", "spill_stores", "spill_loads", "shared"} of a compiled kernel, from ``ptxas -v``."""
    import triton
    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        pathlib.Path(ptx).write_text(kernel.asm["ptx"])
        report = subprocess.run([str(ptxas), f"-arch={arch}", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                capture_output=True, text=True, check=True).stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, report)) else 0  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "shared": kernel.metadata.shared,
            "warps": kernel.metadata.num_warps}


def decode_kernels(rows: int, hidden: int = 2560, inner: int = 5120, proj: int = 192) -> None:
    """Launch (compile-only) the fused decode path's kernels at the mamba-2.8b shape for ``rows`` rows, with
    its tiles (``FUSED_DECODE_TILES``)."""
    bf16 = torch.bfloat16
    residual = torch.zeros(rows, hidden)
    options = cuda_kernels.fused_decode_options(rows, torch.device("cpu"))
    norm, w_in = torch.ones(hidden, dtype=bf16), torch.zeros(2 * inner, hidden, dtype=bf16)
    xz, xdb = torch.empty(rows, 2 * inner, dtype=bf16), torch.zeros(rows, proj)
    state, index = torch.zeros(rows, inner, 4, dtype=bf16), torch.arange(rows)
    conv_w, conv_b, xc = torch.zeros(inner, 4, dtype=bf16), torch.zeros(inner, dtype=bf16), torch.empty_like(xz[:, :inner])
    x_proj = torch.zeros(proj, inner, dtype=bf16)
    cuda_kernels.rmsnorm_gemv(residual, norm, 1e-5, w_in, xz, zero=xdb, pdl=True, **options["in_proj"])
    cuda_kernels.causal_conv_silu_xproj(xz[:, :inner], state, index, conv_w, conv_b, xc, x_proj, xdb, pdl=True,
                                        **options["conv"])
    cuda_kernels.gemv_add_(residual, torch.zeros(rows, inner, dtype=bf16), torch.zeros(hidden, inner, dtype=bf16),
                           pdl=True, **options["out_proj"])


def runtime_kernels(batches, layers: int = 1) -> None:
    """Every kernel the runtime launches (compile-only) at the full mamba-2.8b width with ``layers`` layers
    (bf16, on CPU): decode steps of each batch size on the fused and split paths with every linear layer
    on the skinny kernel, a 21-token chunk and the duplex pass (``prefill_fork_and_step``)."""
    from bench import common
    from duplex.cuda_runtime import CudaMambaRuntime
    config = common.mamba_config(False)
    config.num_hidden_layers = layers
    model = common.build_random(__import__("transformers").MambaForCausalLM, config, torch.device("cpu"),
                                torch.bfloat16)
    for decode in ("fused", "split"):
        rt = CudaMambaRuntime(model, max_rows=max(batches) + 2, kernels="triton", use_graphs=False, linear="skinny",
                              decode=decode, pdl=True, fused_max_rows=2, split_pdl="late")
        for batch in batches:
            state = rt.new_state(batch)
            rt.step(state, rt.embed(torch.zeros(batch, 1, dtype=torch.long)))
            rt.release(state)
    listener, speaker = rt.new_state(1), rt.new_state(1)
    rt.prefill(listener, rt.embed(torch.zeros(1, 21, dtype=torch.long)))
    rt.prefill_fork_and_step(listener, rt.embed(torch.zeros(1, 21, dtype=torch.long)), 15, speaker,
                             rt.embed(torch.zeros(1, 1, dtype=torch.long)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runtime", action="store_true",
                        help="every kernel of the runtime (batches 1, 2, 64, a chunk, the duplex pass)")
    args = parser.parse_args(argv)
    sessions = []
    if args.runtime:
        with compile_only() as session:
            runtime_kernels([1, 2, 64])
        sessions.append(("", session))
    else:
        for rows in args.rows:
            with compile_only() as session:
                decode_kernels(rows)
            sessions.append((f"{rows} row(s) ", session))
    for label, session in sessions:
        seen = set()
        for name, kernel in session.compiled:
            if id(kernel) in seen:
                continue
            seen.add(id(kernel))
            use = ptxas_usage(kernel)
            print(f"{label}{name:18s} {use['warps']} warps: {use['registers']:3d} registers, spills "
                  f"{use['spill_stores']}/{use['spill_loads']} B, shared {use['shared']:6d} B  {_constants(kernel)}")


def _constants(kernel) -> str:
    """The kernel's constexpr specialisation, short."""
    src = getattr(kernel, "src", None)
    constants = getattr(src, "constants", None) or {}
    names = getattr(getattr(src, "fn", None), "arg_names", [])
    return " ".join(f"{names[k[0]]}={v}" for k, v in constants.items() if names and isinstance(v, (int, bool))
                    and names[k[0]].isupper())


if __name__ == "__main__":
    main()
