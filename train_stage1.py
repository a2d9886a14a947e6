#!/usr/bin/env python3
r"""DuplexMamba stage 1, multimodal alignment: ASR data, CNN + ConMamba + adapter trained, LM frozen (spec §3).

Usage:
    python train_stage1.py hparams/S2S/train_stage1.yaml --data_folder=/data/LibriSpeech \
        --asr_checkpoint_folder=/ckpt/conmambamamba_L/save --lm_source=/models/mamba-2.8b-hf
    torchrun --nproc-per-node 6 train_stage1.py hparams/S2S/train_stage1.yaml ...
    python train_stage1.py hparams/tiny/train_stage1.yaml --data_folder=tests/data/corpus   # CPU smoke run

Everything stage-specific is declared in the YAML; the shared Brain lives in src/brain.py.
Our switches (besides SpeechBrain's options below): --skip_bad_rows leaves out manifest rows that fail the checks
made before the first step; --force goes on with an output folder made from other data or another configuration,
or a previous stage that does not fit. Ctrl-C / SIGTERM save a checkpoint and stop; the same command resumes.
"""
import sys

from src.brain import DuplexBrain
from src.stages import run_stage

if __name__ == "__main__":
    run_stage(DuplexBrain, sys.argv[1:], usage=__doc__)
