"""The DuplexMamba network as one container, in the reference checkpoint's order, and its YAML builder.

`DuplexMambaModel` is an `nn.ModuleList` [cnn, encoder, adapter, lm] so that `state_dict()` keys are the
reference `model.ckpt` keys (`0.*` CNN, `1.*` ConMamba, `2.*` adapter, `3.model.*` LM) minus the two dead
positional-encoding buffers (see modules/checkpoint.py). The speech path (Fbank, normaliser, CNN, ConMamba,
adapter) is run by `modules.speech.SpeechEncoder`, which shares these very module objects.

Model YAMLs (hparams/model/full.yaml, tiny.yaml) define `cnn`, `encoder`, `adapter`, `lm`, `model`,
`normalizer`, `speech_encoder`; stage and inference YAMLs include them with `!include:` (a path relative to
the including file), never copy them.
"""
from __future__ import annotations

import pathlib

from hyperpyyaml import load_hyperpyyaml
from torch import nn

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FULL_YAML = REPO_ROOT / "hparams" / "model" / "full.yaml"
TINY_YAML = REPO_ROOT / "hparams" / "model" / "tiny.yaml"


class DuplexMambaModel(nn.ModuleList):
    """[cnn, encoder, adapter, lm]: ConvolutionFrontEnd, ConMambaASR, SpeechAdapter, MambaLM."""

    def __init__(self, cnn: nn.Module, encoder: nn.Module, adapter: nn.Module, lm: nn.Module):
        super().__init__([cnn, encoder, adapter, lm])

    @property
    def cnn(self) -> nn.Module:
        return self[0]

    @property
    def encoder(self) -> nn.Module:
        return self[1]

    @property
    def adapter(self) -> nn.Module:
        return self[2]

    @property
    def lm(self) -> nn.Module:
        return self[3]


def load_model_hparams(yaml_path: str | pathlib.Path = TINY_YAML, overrides: dict | None = None) -> dict:
    """Load a model YAML (or any YAML including one) with hyperpyyaml; returns the resolved dict of objects.

    Build under `with torch.device("meta"):` to get the full-size skeleton without allocating 11 GB.
    """
    path = pathlib.Path(yaml_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model YAML not found (see hparams/model/full.yaml, tiny.yaml)")
    with open(path) as stream:
        return load_hyperpyyaml(stream, overrides or {})


def build_model(yaml_path: str | pathlib.Path = TINY_YAML, overrides: dict | None = None) -> DuplexMambaModel:
    """The `model` entry of a model YAML: a DuplexMambaModel with fresh (seeded) weights."""
    hparams = load_model_hparams(yaml_path, overrides)
    if "model" not in hparams or not isinstance(hparams["model"], DuplexMambaModel):
        raise ValueError(f"{yaml_path}: expected a `model: !new:modules.model.DuplexMambaModel` entry")
    return hparams["model"]
