#!/usr/bin/env python3
r"""ASR pre-training (paper §3.1): ConMamba encoder + Mamba decoder, CTC + attention loss (src/asr_pretraining.py).

Its save folder is what stage 1 takes as `asr_checkpoint_folder` (CKPT+*/model.ckpt with the reference keys
0.* and 1.*, plus normalizer.ckpt); see docs/pretraining.md.

Usage:
    python train_asr.py hparams/asr/tiny.yaml --data_folder=tests/data/corpus --device=cpu   # CPU smoke run
    python train_asr.py hparams/asr/demo.yaml --data_folder=data/synth --max_minutes=9        # one <=10 min step
    torchrun --nproc-per-node 2 train_asr.py hparams/asr/conmambamamba_large.yaml --data_folder=/data/LibriSpeech
Re-running the same command resumes from the newest checkpoint in <output_folder>/save.
"""
import sys

from src.asr_pretraining import run_asr_pretraining

if __name__ == "__main__":
    run_asr_pretraining(sys.argv[1:], usage=__doc__)
