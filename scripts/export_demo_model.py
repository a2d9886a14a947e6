"""Write a trained save folder as one small half-precision CKPT folder (how example/model/ was made).

Why: the demo model ships in git, where every megabyte stays forever. The CKPT+* folders of `save` are averaged
(as every loader does), floating tensors are stored in float16 (modules/checkpoint.py casts them back to the
model's dtype on load), the tied embedding / LM head matrix is stored once, and the two dead positional-encoding
buffers that our loader drops anyway are left out. Normaliser statistics come from the newest folder.

    python scripts/export_demo_model.py results/demo/demo_stage3/3407/save example/model

With `--check YAML`, the export is then compared with the save folder it came from: the greedy state token and
reply of both (each loaded in float32) on `--wavs` and up to `--max-rows` rows of `--manifest`, written to
OUT/export_check.json. That is the measured cost of storing float16 (the speedrun's export step does this).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

import torch
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modules.checkpoint import (DROPPED_BUFFERS, EMBEDDING_KEY, LM_HEAD_KEY, META_FILE, MODEL_FILE,  # noqa: E402
                                NORMALIZER_FILE, find_checkpoints, read_model_state)


def half_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float16 copy of a model state without the dead buffers; the tied matrix is one tensor under both keys."""
    out = {key: (value.half() if value.is_floating_point() else value).contiguous()
           for key, value in state.items() if key not in DROPPED_BUFFERS and key != LM_HEAD_KEY}
    if LM_HEAD_KEY in state:
        out[LM_HEAD_KEY] = out[EMBEDDING_KEY]  # torch.save writes a shared storage once
    return out


def export(save_folder: pathlib.Path, out_folder: pathlib.Path, meta: dict | None = None) -> pathlib.Path:
    """Average `save_folder`'s checkpoints into a new CKPT+* folder under `out_folder`; returns it."""
    sources = find_checkpoints(save_folder)
    target = out_folder / f"CKPT+{time.strftime('%Y-%m-%d+%H-%M-%S')}+00"
    target.mkdir(parents=True)
    torch.save(half_state(read_model_state(save_folder)), target / MODEL_FILE)
    shutil.copyfile(sources[-1] / NORMALIZER_FILE, target / NORMALIZER_FILE)
    with open(sources[-1] / META_FILE) as stream:
        source_meta = yaml.safe_load(stream) or {}
    with open(target / META_FILE, "w") as stream:
        stream.write("# yamllint disable\n")
        yaml.safe_dump({**source_meta, **(meta or {}), "averaged_from": [p.name for p in sources],
                        "dtype": "float16"}, stream)
    return target


def greedy_outputs(yaml_path, checkpoint, wavs, device="cpu", max_new_tokens=24) -> list[tuple[str, list[int]]]:
    """(greedy state token, greedy reply ids) of `checkpoint`, loaded in float32, for each audio file."""
    from CustomGenerator import CustomGenerator, GenerationOptions
    from duplex.sampling import SamplingConfig
    from modules.model import load_inference_network
    from modules.tokenizer import load_tokenizer
    from src.audio import load_audio
    hparams = load_inference_network(yaml_path, checkpoint=checkpoint, device=device, precision="fp32")
    greedy = SamplingConfig(greedy=True)
    generator = CustomGenerator(hparams["net"], load_tokenizer(num_state_tokens=3),
                                GenerationOptions(state=greedy, reply=greedy, max_new_tokens=max_new_tokens))
    return [(result.state_token, list(result.reply_ids)) for result in map(generator.generate, map(load_audio, wavs))]


def compare_with_source(yaml_path, save_folder, exported, wavs, device="cpu") -> dict:
    """How often the float16 export decides and replies as the float32 save folder does, on `wavs`."""
    original = greedy_outputs(yaml_path, save_folder, wavs, device)
    stored = greedy_outputs(yaml_path, exported, wavs, device)
    pairs = list(zip(wavs, original, stored))
    return {"files": len(wavs), "same_state_token": sum(a[0] == b[0] for _, a, b in pairs),
            "same_state_and_reply": sum(a == b for _, a, b in pairs),
            "differing": [str(wav) for wav, a, b in pairs if a != b][:20],
            "yaml": str(yaml_path), "save_folder": str(save_folder), "device": device}


def check_inputs(wavs, manifest, max_rows) -> list[pathlib.Path]:
    """The audio of --check: --wavs (a folder gives its *.wav) and --max-rows rows of --manifest, all present."""
    from src import evaluate
    files = []
    for name in map(pathlib.Path, wavs):
        files += sorted(name.glob("*.wav")) if name.is_dir() else [name]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"error: --wavs: no such audio file(s): {', '.join(missing)}")
    try:
        rows = evaluate.read_manifest(manifest, [], max_rows) if manifest is not None else []
    except evaluate.EvaluationError as error:  # a missing manifest, column or audio file: one line, no traceback
        raise SystemExit(f"error: {error}") from None
    return files + [row.wav for row in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("save_folder", type=pathlib.Path, help="a stage's save folder (or one CKPT folder)")
    parser.add_argument("out_folder", type=pathlib.Path, help="where the new CKPT+* folder goes")
    parser.add_argument("--check", type=pathlib.Path, metavar="YAML",
                        help="compare the export with the save folder under this inference YAML")
    parser.add_argument("--wavs", nargs="*", default=[], help="audio files (or folders of *.wav) for --check")
    parser.add_argument("--manifest", type=pathlib.Path, help="a manifest whose audio --check also uses")
    parser.add_argument("--max-rows", type=int, default=100, help="rows of --manifest, evenly spaced (default 100)")
    parser.add_argument("--device", default="cpu", help="where --check runs (cpu, cuda)")
    args = parser.parse_args(argv)
    inputs = check_inputs(args.wavs, args.manifest, args.max_rows) if args.check else []  # checked before work
    target = export(args.save_folder, args.out_folder)
    size = sum(p.stat().st_size for p in target.iterdir()) / 2**20
    print(f"wrote {target} ({size:.2f} MiB)")
    if args.check:
        result = compare_with_source(args.check, args.save_folder, args.out_folder, inputs, args.device)
        (args.out_folder / "export_check.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"float16 export vs float32 save folder on {result['files']} files: same state token "
              f"{result['same_state_token']}, same state token and reply {result['same_state_and_reply']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
