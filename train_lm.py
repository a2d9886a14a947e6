#!/usr/bin/env python3
r"""Text pre-training of the small Mamba LM, our stand-in for Mamba-2.8B (src/lm_pretraining.py).

The LM is the one of the stage model YAML; after every epoch it is exported as a Hugging Face folder
(<output_folder>/lm) that stage 1 loads with --lm_source and keeps frozen. See docs/pretraining.md.

Usage:
    python -m src.text_pool --out data/text_pool --manifests data/synth/train.csv          # the text (once)
    python train_lm.py hparams/lm/tiny.yaml --text_file=data/text_pool/train.txt \
        --valid_text_file=data/text_pool/valid.txt --device=cpu                              # CPU smoke run
    python train_lm.py hparams/lm/demo.yaml --data_folder=data/synth --device=cuda --max_minutes=9
Re-running the same command resumes from the newest checkpoint in <output_folder>/save.
"""
import sys

from src.lm_pretraining import run_lm_pretraining

if __name__ == "__main__":
    run_lm_pretraining(sys.argv[1:], usage=__doc__)
