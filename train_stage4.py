#!/usr/bin/env python3
r"""DuplexMamba stage 4, streaming alignment: stage-3 data, each utterance encoded in independent 3 s segments (one adapter
pass over their concatenation), CNN + ConMamba + adapter trained, LM frozen; starts from the stage-3 average (spec §3).

Usage:
    python train_stage4.py hparams/S2S/train_stage4.yaml --data_folder=/data/corpus \
        --previous_output_folder=results/DuplexMamba_train_stage3-011/3407
    torchrun --nproc-per-node 1 train_stage4.py hparams/S2S/train_stage4.yaml ...
    python train_stage4.py hparams/tiny/train_stage4.yaml --data_folder=tests/data/corpus   # CPU smoke run

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
