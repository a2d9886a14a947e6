"""The speech encoder on GPU for one duplex slice: bf16 autocast and a CUDA graph.

A 3 s slice is only 76 encoder frames, so the ~500 small kernels of CNN + 12 ConMamba layers +
adapter cost far more to launch than to run. The slice length is fixed in a duplex session, so the
whole encoder (Fbank + normaliser + CNN + ConMamba + adapter) is captured once for that length and
replayed (the Fbank part stays eager if it cannot be captured). The math is ``modules/speech.py``'s
(one encode path); the scan inside is whatever ``modules.selective_scan.select_scan_backend`` picks
(mamba-ssm when installed).
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def move_feature_constants(features: torch.nn.Module, device: torch.device) -> int:
    """Put the plain tensor attributes of SpeechBrain's feature modules (STFT window, filterbank
    frequencies; not parameters or buffers, so ``.to()`` leaves them on the CPU) on ``device``, and tell
    the filterbank to build its matrix there. Otherwise every call rebuilds the matrix on the CPU and
    copies it over from pageable memory, which a CUDA graph cannot capture. Returns how many moved."""
    moved = 0
    for module in features.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) \
                    and value.device != device:
                setattr(module, name, value.to(device))
                moved += 1
        if isinstance(getattr(module, "device_inp", None), torch.device):
            module.device_inp = device
    return moved


def cast_matmul_weights(modules, dtype: torch.dtype, keep: tuple[str, ...] = ("dt_proj", "dt_proj_b")) -> int:
    """Convert the parameters of every Linear / Conv1d / Conv2d inside ``modules`` to ``dtype`` in place
    (what autocast computes them in); returns how many layers were converted. Layers named in ``keep``
    stay fp32: the BiMamba scans read the dt_proj biases in fp32 outside autocast."""
    count = 0
    for module in modules:
        for name, layer in module.named_modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)) \
                    and name.rsplit(".", 1)[-1] not in keep:
                layer.to(dtype)
                count += 1
    return count


class GraphedSpeechEncoder:
    """Encode (N,) waveforms of a fixed length through ``SpeechEncoder`` with a replayed CUDA graph.

    Other lengths (or a failed capture) take the eager path under the same autocast, so callers never
    need to care. ``encoder`` must be in eval mode (the normaliser then never updates).

    With a half ``dtype`` and ``cast_weights`` the weights of the CNN's, ConMamba's and adapter's linear
    and convolution layers are converted to ``dtype`` in place, once: autocast would cast them on every
    call (and cannot cache casts inside a CUDA graph), and it computes those layers in ``dtype`` anyway,
    so the result is the same. Norms, the normaliser, the SSM parameters and dt_proj stay fp32.
    """

    def __init__(self, encoder, num_samples: int = 48000, dtype: torch.dtype = torch.bfloat16,
                 use_graph: bool = True, cast_weights: bool = True):
        if encoder.training:
            raise ValueError("GraphedSpeechEncoder: call encoder.eval() first (a training-mode normaliser "
                             "would update its statistics on every slice).")
        self.encoder = encoder
        self.num_samples = int(num_samples)
        self.dtype = dtype
        self.device = next(encoder.parameters()).device
        self._graph = None
        self._feats = self._out = None
        if cast_weights and self._autocast:
            cast_matmul_weights([encoder.cnn, encoder.encoder, encoder.adapter], dtype)
        if use_graph and self.device.type == "cuda":
            move_feature_constants(encoder.compute_features, self.device)
        if use_graph and self.device.type == "cuda":
            self._capture()

    @property
    def _autocast(self) -> bool:
        return self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16)

    @property
    def graphed(self) -> bool:
        return self._graph is not None

    @property
    def graphed_features(self) -> bool:
        """True when the Fbank + normaliser are inside the graph too (else they run eagerly first)."""
        return self._graph is not None and self._feats is None

    @torch.no_grad()
    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        """(N,) 16 kHz wav -> (1, P, lm_dim) speech embeddings in ``dtype``."""
        wav = wav.to(self.device, torch.float32)
        if self._graph is None or wav.shape != (self.num_samples,):
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self._autocast):
                return self.encoder.encode_wav(wav).to(self.dtype)
        if self._feats is None:  # the whole encoder is in the graph
            self._wav.copy_(wav)
        else:
            self._feats.copy_(self._features(wav))
        self._graph.replay()
        return self._out.clone()

    @torch.no_grad()
    def encode_batch(self, wavs: torch.Tensor, max_rows: int = 128) -> torch.Tensor:
        """Equal-length slices (B, N) -> (B, P, lm_dim) in ``dtype``: eager under the same autocast, in pieces
        of ``max_rows`` (the scheduler's batched encoder pass; one row alone replays the graph)."""
        wavs = wavs.to(self.device, torch.float32)
        if wavs.shape[0] == 1:
            return self(wavs[0])
        pieces = []
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self._autocast):
            for start in range(0, wavs.shape[0], max_rows):
                pieces.append(self.encoder._encode(wavs[start:start + max_rows], None, None, epoch=None)
                              .to(self.dtype))  # (b, P, lm_dim)
        return torch.cat(pieces)  # (B, P, lm_dim)

    def _features(self, wav: torch.Tensor) -> torch.Tensor:
        feats = self.encoder.compute_features(wav.unsqueeze(0))  # (1, T, 80)
        return self.encoder.normalizer(feats, torch.ones(1, device=self.device))  # (1, T, 80)

    def _body(self, feats: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=self.dtype, enabled=self._autocast):
            encoded = self.encoder.encoder(self.encoder.cnn(feats))  # (1, T', d_model)
            return self.encoder.adapter(encoded).to(self.dtype)  # (1, P, lm_dim)

    @torch.no_grad()
    def _capture(self) -> None:
        """Capture features + body from a static waveform buffer; if some feature op cannot be captured
        (a host sync), capture the body alone from a static feature buffer; if that fails too, stay eager.
        The features are ~15 small kernels whose launches cost ~1 ms of host time per slice."""
        self._wav = torch.randn(self.num_samples, device=self.device) * 0.1
        if self._try_capture(lambda: self._body(self._features(self._wav))):
            return
        self._feats = self._features(self._wav).clone()
        if not self._try_capture(lambda: self._body(self._feats)):
            self._feats = None

    def _try_capture(self, run) -> bool:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: cuDNN/cuBLAS choices, lazy buffers
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run()
        except RuntimeError as err:  # an op that syncs with the host cannot be captured
            logger.info("GraphedSpeechEncoder: capture failed (%s)", err)
            torch.cuda.synchronize()
            return False
        self._graph, self._out = graph, out
        return True
