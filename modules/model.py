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

import torch
from hyperpyyaml import load_hyperpyyaml
from torch import nn

from modules.checkpoint import load_reference_checkpoint

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


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Top-level keys of an inference YAML (duplex/duplex.yaml, duplex_tiny.yaml) and who reads them; any other key is
# a typo (hyperpyyaml would silently keep it), so it is refused. A new block is added here and to its reader.
INFERENCE_KEYS = {
    "net": "modules.model.load_inference_network (the model YAML it includes, with overrides)",
    "checkpoint": "modules.model.load_inference_network",
    "device": "modules.model.load_inference_network",
    "precision": "modules.model.load_inference_network",
    "seed": "CustomGenerator.py and the duplex block",
    "generator": "CustomGenerator.py (GenerationOptions)",
    "duplex": "duplex/engine.py (DuplexConfig)",
    "server": "duplex/server.py",
}


def load_inference_network(yaml_path, checkpoint=None, device=None, precision=None, overrides=None) -> dict:
    """Load an inference YAML (duplex/duplex.yaml, duplex_tiny.yaml) whose `net:` includes a model YAML, and
    make its network ready: checkpoint (+ normaliser statistics) loaded, on `device`, in eval mode (no dropout,
    frozen normaliser statistics), LM weights in bfloat16 when `precision` is "bf16".

    `device` and `precision` default to the YAML's keys of those names (else cpu, fp32).
    `checkpoint` (a save folder or CKPT folder) overrides the YAML's `checkpoint` key and builds the LM
    weightless on the meta device, to be filled from the file. From a save folder, the CKPT folders its stage's
    test averaged are served (`tested_checkpoints.yaml`; without it, all of them, with a warning). Without any checkpoint the weights are the
    YAML's seeded random ones (tiny model). Returns the resolved YAML dict; the network is `hparams["net"]`.
    """
    check_inference_keys(yaml_path)
    overrides = dict(overrides or {})
    if checkpoint:
        overrides["checkpoint"] = str(checkpoint)
        overrides["net"] = {**overrides.get("net", {}), "lm_device": "meta"}
    hparams = load_model_hparams(yaml_path, overrides)
    net = hparams.get("net")
    if not isinstance(net, dict) or not isinstance(net.get("model"), DuplexMambaModel):
        raise ValueError(f"{yaml_path}: expected `net: !include:<model yaml>` defining model and speech_encoder")
    device = _checked_device(device or hparams.get("device", "cpu"))
    precision = precision or hparams.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"{yaml_path}: precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    checkpoint = hparams.get("checkpoint")
    if checkpoint:
        checkpoint = resolve_checkpoint_path(checkpoint, yaml_path)
        hparams["checkpoint"] = str(checkpoint)
        load_reference_checkpoint(net["model"], checkpoint, normalizer=net["normalizer"], use_tested=True)
    elif any(p.is_meta for p in net["model"].parameters()):
        raise ValueError(f"{yaml_path}: the LM is built without weights (lm_device: meta) but no checkpoint is "
                         f"given; pass --checkpoint <save folder> or set `checkpoint:` in the YAML")
    net["model"].to(device)
    net["speech_encoder"].to(device)
    net["model"].lm.to(PRECISIONS[precision])
    net["model"].eval()
    net["speech_encoder"].eval()
    return hparams


def resolve_checkpoint_path(checkpoint, yaml_path) -> pathlib.Path:
    """A relative checkpoint path is taken from the current directory when it exists there, else from the YAML's
    folder: a YAML that ships with its weights (duplex_demo.yaml -> ../example/model) works from any directory,
    while paths given on the command line or written for training output (results/...) keep their meaning."""
    path = pathlib.Path(checkpoint)
    if path.is_absolute() or path.exists():
        return path
    beside_yaml = pathlib.Path(yaml_path).parent / path
    return beside_yaml if beside_yaml.exists() else path


def check_inference_keys(yaml_path) -> None:
    """Refuse unknown keys in an inference YAML: at the top level, and in the `net:` overrides of the model YAML
    it includes (hyperpyyaml's `!include:` accepts any override key, so `num_state_token: 3` would be ignored).
    """
    path = pathlib.Path(yaml_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: inference YAML not found (see duplex/duplex.yaml, duplex_tiny.yaml)")
    raw = _raw_yaml(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of keys ({', '.join(INFERENCE_KEYS)})")
    unknown = sorted(set(raw) - set(INFERENCE_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {unknown}; known keys: {sorted(INFERENCE_KEYS)}. "
                         "Check the spelling (a new block must also be added to modules.model.INFERENCE_KEYS).")
    net = raw.get("net")
    if isinstance(net, _Tagged) and net.tag.startswith("!include:"):
        included = path.parent / net.tag[len("!include:"):]
        model_keys = _raw_yaml(included) if included.is_file() else None
        wrong = sorted(set(net) - set(model_keys)) if isinstance(model_keys, dict) else []
        if wrong:
            raise ValueError(f"{path}: `net:` overrides key(s) {wrong} that {included.name} does not define; "
                             f"keys it has: {sorted(k for k in model_keys if not str(k).startswith('__'))}.")


class _Tagged(dict):
    """A mapping read with its hyperpyyaml tag (e.g. `!include:../hparams/model/tiny.yaml`), not resolved."""

    tag = ""


def _raw_yaml(path: pathlib.Path):
    """The YAML as written: hyperpyyaml tags are kept as text, nothing is built or resolved."""
    import yaml

    def tagged(loader, suffix, node):
        if isinstance(node, yaml.MappingNode):
            mapping = _Tagged(loader.construct_mapping(node))
            mapping.tag = "!" + suffix
            return mapping
        return None

    loader = type("RawTags", (yaml.SafeLoader,), {})
    loader.add_multi_constructor("!", tagged)
    with open(path) as stream:
        return yaml.load(stream, Loader=loader)


def _checked_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a torch device; use cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but no CUDA GPU is available; use --device cpu")
    return device
