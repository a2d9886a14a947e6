"""The language model: transformers' `MambaForCausalLM` (Mamba-2.8B in the paper), wrapped, never vendored.

`MambaLM.model` is the plain transformers model so that its state-dict keys are the reference's `3.model.*` and
the duplex runtime can read its weights directly. The embedding matrix is tied to the LM head; resizing it to the
stage's vocabulary (50,278 rows in stages 1-2, 50,280 in stages 3-4, spec §1.7) keeps the tie and draws new rows
once from N(0, 0.01^2) (the reference drew them twice, once per name of the same tied matrix).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import pathlib

import torch
from torch import nn
from transformers import MambaConfig, MambaForCausalLM
from transformers.models.mamba import modeling_mamba

log = logging.getLogger(__name__)
NEW_ROW_STD = 0.01


def _no_fused_training_path(*args, **kwargs):
    """Stands in for `mamba_inner_fn`: None tells transformers' MambaMixer to take its step-by-step path."""
    return None


def guard_fused_training_path(find_spec=importlib.util.find_spec) -> bool:
    """Switch off transformers' fused Mamba training shortcut when it cannot run; True when switched off.

    Why: transformers binds `MambaMixer`'s training shortcut to mamba-ssm's `mamba_inner_fn` as soon as
    `mamba_ssm` imports, but that function also needs causal-conv1d and fails with an AssertionError without it
    (seen on an H200 with mamba-ssm alone: every LM training step died). mamba-ssm and causal-conv1d are optional
    accelerators here, so with mamba-ssm alone the mixer takes its own path instead: mamba-ssm's selective scan
    and transformers' PyTorch convolution. The same numbers, a little slower.
    """
    if find_spec("mamba_ssm") is None or find_spec("causal_conv1d") is not None:
        return False
    if modeling_mamba.mamba_inner_fn is not _no_fused_training_path:
        log.info("mamba-ssm without causal-conv1d: transformers' fused Mamba training path is switched off")
        modeling_mamba.mamba_inner_fn = _no_fused_training_path
    return True


guard_fused_training_path()


def use_parallel_scan(model: MambaForCausalLM, find_spec=importlib.util.find_spec) -> bool:
    """Let transformers' pure-torch Mamba path scan with mambapy's parallel scan when mambapy is installed.

    Why: without mamba-ssm (every CPU, and a GPU without the kernels), transformers' mixer scans step by step and
    slices one time step per iteration; autograd gives every slice a gradient as large as the whole sequence, so
    the backward pass grows with the square of the length (measured on 2 CPU cores: one step of the speedrun LM
    on 4 x 256 tokens, bench/lm_scan_speed.py). mambapy's `pscan` (a small pure-PyTorch package) is the parallel
    scan that transformers itself offers through `MambaConfig.use_mambapy`. It is a speed choice only: where
    mamba-ssm's kernel runs, transformers ignores it. Returns whether it is on. Only the mixers are switched, not
    `model.config`: what this machine has installed must not travel in a saved config.json.
    """
    available = find_spec("mambapy") is not None
    for layer in model.backbone.layers:
        layer.mixer.use_mambapy = available
    return available


class MambaLM(nn.Module):
    """A Mamba causal LM from a local HF folder (`source`) or from config numbers (`config`, random weights).

    Arguments
    ---------
    source : local folder with config.json and *.safetensors (e.g. mamba-2.8b-hf); loaded offline, no .bin needed.
    config : dict of `transformers.MambaConfig` keyword arguments, used when `source` is None (tiny models, the
        full-size skeleton on the meta device before a checkpoint is loaded). With `source` it is a cross-check.
    vocab_size : rows of the tied embedding / LM head after loading (see modules.tokenizer.vocab_rows).
    freeze : turn off gradients of every LM parameter (stages 1 and 4).
    dtype : parameter dtype (torch.dtype or its name, e.g. "bfloat16"); default float32 as the reference.
    seed : seed of the random weights and new vocabulary rows, for reproducible tiny models.
    device : where to build a `config` model; "meta" gives a weightless skeleton that a checkpoint load then
        fills (modules.checkpoint assigns tensors), skipping the random init of 2.8B parameters.
    """

    def __init__(self, source=None, config=None, vocab_size=None, freeze=False, dtype=None, seed=None,
                 device=None):
        super().__init__()
        dtype = _as_dtype(dtype)
        with torch.random.fork_rng(devices=[]), _device_context(device):
            if seed is not None:
                torch.manual_seed(seed)
            self.model = _load(source, dtype) if source is not None else _build(config, dtype)
            if source is not None and config is not None:
                _check_config_matches(self.model.config, config, source)
            if vocab_size is not None and vocab_size != self.model.config.vocab_size:
                resize_vocabulary(self.model, vocab_size)
        use_parallel_scan(self.model)
        if freeze:
            self.model.requires_grad_(False)

    @property
    def config(self) -> MambaConfig:
        return self.model.config

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (...,) -> embeddings (..., H) from the (tied) input embedding."""
        return self.model.get_input_embeddings()(ids)

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, L, H) -> logits (B, L, V) in float32, one parallel pass without a cache."""
        return self.model(inputs_embeds=inputs_embeds, use_cache=False).logits  # (B, L, V)


def resize_vocabulary(model: MambaForCausalLM, rows: int) -> None:
    """Resize the tied embedding / LM head to `rows`, keeping the first min(old, rows) rows.

    Growth rows are drawn once from N(0, 0.01^2) (from the global RNG; seed it for reproducibility); shrinking
    drops the last rows, as HF's resize_token_embeddings does for stages 1-2 (50,280 -> 50,278).
    """
    old = model.get_input_embeddings().weight  # (V_old, H)
    kept = min(old.shape[0], rows)
    empty = torch.empty(rows, old.shape[1], device=old.device, dtype=old.dtype)  # (V, H), no init draw
    new = nn.Embedding(rows, old.shape[1], _weight=empty)
    with torch.no_grad():
        new.weight[:kept] = old[:kept]
        if rows > kept:
            new.weight[kept:].normal_(0.0, NEW_ROW_STD)
    new.weight.requires_grad_(old.requires_grad)
    model.set_input_embeddings(new)
    model.lm_head.weight = new.weight  # keep the tie: one matrix, two names
    model.config.vocab_size = rows


def _load(source, dtype) -> MambaForCausalLM:
    folder = pathlib.Path(source)
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder}: expected a local Hugging Face folder with config.json and *.safetensors "
                                f"(e.g. state-spaces/mamba-2.8b-hf); .bin copies are not needed")
    log.info("loading the LM from %s", folder)
    return MambaForCausalLM.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                            dtype=dtype or torch.float32)


def _build(config, dtype) -> MambaForCausalLM:
    if config is None:
        raise ValueError("MambaLM needs either source (a local HF folder) or config (MambaConfig numbers)")
    model = MambaForCausalLM(MambaConfig(**dict(config)))
    return model.to(dtype) if dtype is not None else model


def _check_config_matches(loaded: MambaConfig, expected: dict, source) -> None:
    """A YAML that states the architecture must describe the folder it loads; mismatches are listed."""
    ignored = {"vocab_size"}  # resized after loading
    resolved = MambaConfig(**dict(expected))  # "auto" values (time_step_rank) as the folder's config.json has them
    wrong = [f"{key}: folder {getattr(loaded, key, None)!r} vs configuration {getattr(resolved, key, value)!r}"
             for key, value in dict(expected).items()
             if key not in ignored and getattr(loaded, key, None) != getattr(resolved, key, value)]
    if wrong:
        raise ValueError(f"{source}: config.json does not match the model configuration: " + "; ".join(wrong))


def _device_context(device):
    """Build on `device` if given; otherwise leave any caller's `with torch.device(...)` in charge."""
    return torch.device(device) if device is not None else contextlib.nullcontext()


def _as_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype name (use float32, bfloat16 or float16)")
    return value
