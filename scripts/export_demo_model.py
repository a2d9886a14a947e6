"""Write a trained save folder as one small half-precision CKPT folder (how example/model/ was made).

Why: the demo model ships in git, where every megabyte stays forever. The CKPT+* folders of `save` are averaged
(as every loader does), floating tensors are stored in float16 (modules/checkpoint.py casts them back to the
model's dtype on load), the tied embedding / LM head matrix is stored once, and the two dead positional-encoding
buffers that our loader drops anyway are left out. Normaliser statistics come from the newest folder.

    python scripts/export_demo_model.py results/demo/demo_stage3/3407/save example/model
"""
from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("save_folder", type=pathlib.Path, help="a stage's save folder (or one CKPT folder)")
    parser.add_argument("out_folder", type=pathlib.Path, help="where the new CKPT+* folder goes")
    args = parser.parse_args(argv)
    target = export(args.save_folder, args.out_folder)
    size = sum(p.stat().st_size for p in target.iterdir()) / 2**20
    print(f"wrote {target} ({size:.2f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
