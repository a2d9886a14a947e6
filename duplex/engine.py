"""Glue: build duplex sessions from an inference YAML (duplex/duplex.yaml, duplex_tiny.yaml), slice audio.

The YAML's `net:` / `checkpoint:` / `device:` / `precision:` keys are read by
``modules.model.load_inference_network``; its `duplex:` block becomes a ``DuplexConfig``. One ``Engine``
holds the network and the LM runtime; every ``new_session()`` shares them (only states are per session), and
``new_scheduler()`` runs many sessions' model work together (``duplex/scheduler.py``).
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from dataclasses import dataclass

import torch

from duplex.runtime import TorchMambaRuntime
from duplex.session import DuplexConfig, DuplexSession


def slice_audio(wav: torch.Tensor, sample_rate: int = 16000, slice_seconds: float = 3.0,
                merge_short_tail: bool = True) -> list[torch.Tensor]:
    """Cut (N,) audio into slices of ``slice_seconds``.

    With ``merge_short_tail`` (the reference's ``cut_audio``), a last piece shorter than a slice joins the
    previous one, so the last slice lasts 1-2 slice lengths; audio shorter than one slice is one slice.
    Without it the short tail is its own slice. Empty audio gives no slice.

    Example
    -------
    >>> [s.numel() for s in slice_audio(torch.zeros(8 * 16000), 16000, 3.0)]
    [48000, 80000]
    >>> [s.numel() for s in slice_audio(torch.zeros(8 * 16000), 16000, 3.0, merge_short_tail=False)]
    [48000, 48000, 32000]
    """
    wav = wav.reshape(-1)
    length = int(round(slice_seconds * sample_rate))
    if length <= 0:
        raise ValueError(f"slice_audio: slice_seconds must be > 0, got {slice_seconds}.")
    count = math.ceil(wav.numel() / length)
    bounds = [min(i * length, wav.numel()) for i in range(count + 1)]
    if merge_short_tail and count > 1 and bounds[-1] - bounds[-2] < length:
        del bounds[-2]
    return [wav[a:b] for a, b in zip(bounds, bounds[1:])]


def make_runtime(hf_model, device: torch.device, state_rows: int | None = None):
    """The GPU backend on CUDA (pool, fused kernels, graphs), the pure-torch reference elsewhere.

    ``state_rows`` sizes the GPU backend's state pool (all branches of all sessions; None: its default);
    the CPU reference allocates each branch on demand and ignores it.
    """
    if device.type == "cuda":
        from duplex.cuda_runtime import CudaMambaRuntime
        return CudaMambaRuntime(hf_model) if state_rows is None else CudaMambaRuntime(hf_model, max_rows=state_rows)
    return TorchMambaRuntime(hf_model)


class _WavEncoder:
    """wav (N,) on any device -> (1, P, H) on the model's device, without autograd."""

    def __init__(self, speech_encoder, device: torch.device):
        self.speech_encoder, self.device = speech_encoder, device

    @torch.no_grad()
    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        return self.speech_encoder.encode_wav(wav.to(self.device))  # (1, P, H)

    @torch.no_grad()
    def encode_batch(self, wavs: torch.Tensor) -> torch.Tensor:
        """Equal-length slices (B, N) in one pass -> (B, P, H) (the scheduler's batched encoder pass)."""
        return self.speech_encoder._encode(wavs.to(self.device), None, None, epoch=None)  # (B, P, H)


@dataclass
class Engine:
    """A loaded network + runtime + tokenizer + duplex settings; makes sessions."""

    runtime: object
    encode: object  # wav (N,) -> (1, P, H)
    tokenizer: object
    config: DuplexConfig

    def new_session(self, **config_overrides) -> DuplexSession:
        config = dataclasses.replace(self.config, **config_overrides)
        return DuplexSession(self.runtime, self.encode, self.tokenizer, config)

    def new_scheduler(self, max_sessions: int | None = None):
        """A ``Scheduler`` over this engine's runtime and encoder: add ``new_session()``s to it and ``tick``."""
        from duplex.scheduler import Scheduler
        return Scheduler(self.runtime, self.encode, max_sessions=max_sessions)


def duplex_config_from(hparams: dict, source: str) -> DuplexConfig:
    """The `duplex:` block of a loaded inference YAML as a DuplexConfig (missing block = defaults)."""
    block = hparams.get("duplex")
    if block is None:
        return DuplexConfig()
    if not isinstance(block, dict):
        raise ValueError(f"{source}: `duplex:` must be a mapping of DuplexConfig keys, got {type(block).__name__}.")
    return DuplexConfig.from_dict(block, source=source)


def load_engine(yaml_path: str | pathlib.Path, checkpoint=None, device=None, precision=None,
                state_rows: int | None = None) -> Engine:
    """Load the network of an inference YAML (checkpoint, device, precision as the YAML or the arguments say).

    ``state_rows``: branch states the GPU backend's pool holds (a server sizes it from its connection limit).
    """
    from modules.model import load_inference_network
    from modules.tokenizer import check_added_tokens, load_tokenizer

    hparams = load_inference_network(yaml_path, checkpoint=checkpoint, device=device, precision=precision)
    config = duplex_config_from(hparams, str(yaml_path))
    net = hparams["net"]
    lm = net["model"].lm.model
    runtime = make_runtime(lm, lm.lm_head.weight.device, state_rows)
    tokenizer = load_tokenizer(num_state_tokens=3)
    check_added_tokens(tokenizer, 3, source=str(yaml_path))
    if lm.config.vocab_size < len(tokenizer):
        raise ValueError(f"{yaml_path}: the LM has {lm.config.vocab_size} vocabulary rows but the duplex tokenizer "
                         f"needs {len(tokenizer)} (state tokens); use a stage-3/4 model (num_state_tokens: 3).")
    return Engine(runtime, make_encoder(net["speech_encoder"], runtime, config), tokenizer, config)


def make_encoder(speech_encoder, runtime, config: DuplexConfig):
    """wav (N,) -> (1, P, H): on CUDA the encoder body replayed from a CUDA graph for the session's slice
    length (other lengths, e.g. a merged last slice, run eagerly), autocast to the LM's half dtype;
    elsewhere the plain eager encoder."""
    if runtime.device.type != "cuda":
        return _WavEncoder(speech_encoder, runtime.device)
    from duplex.cuda_encoder import GraphedSpeechEncoder
    return GraphedSpeechEncoder(speech_encoder, round(config.slice_seconds * config.sample_rate),
                                dtype=runtime.dtype)
