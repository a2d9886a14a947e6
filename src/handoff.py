"""Stage hand-off and test-time checkpoint averaging, on top of modules/checkpoint.py.

Stage N starts from the average of every checkpoint in stage N-1's save folder (spec §3), declared in the stage
YAML as `init_from`:

    init_from:
        folder: results/<previous experiment>/<seed>/save   # null: start from the model YAML's weights
        prefixes: null        # null = every key, strictly; stage 1 loads only the ConMamba ASR encoder keys
        grow_vocabulary: False  # stage 3: 50278 -> 50280 rows, the two new rows drawn once (tied matrix)
        load_normalizer: True   # the feature statistics travel with the model

The normaliser statistics come from the newest checkpoint of that folder, so they travel stage -> stage and on
to inference (the reference restarted them in every stage and never loaded them at inference, spec §1.2).
"""
import logging

import torch

from speechbrain.utils.distributed import if_main_process

from modules.checkpoint import (NORMALIZER_FILE, average_state_dicts, check_state_dict, load_normalizer,
                                load_reference_checkpoint, read_model_state, record_tested_checkpoints)

logger = logging.getLogger(__name__)
INIT_KEYS = {"folder", "prefixes", "grow_vocabulary", "load_normalizer", "seed"}


def load_previous_stage(init_from, model, normalizer):
    """Apply the YAML's `init_from` to a freshly built model; returns the checkpoint folders used."""
    unknown = set(init_from) - INIT_KEYS
    if unknown:
        raise ValueError(f"init_from has unknown keys {sorted(unknown)}; allowed: {sorted(INIT_KEYS)}.")
    if init_from.get("folder") is None:
        logger.info("init_from.folder is null: starting from the model YAML's weights.")
        return []
    folders = load_reference_checkpoint(
        model, init_from["folder"], normalizer=None, grow_vocabulary=init_from.get("grow_vocabulary", False),
        prefixes=init_from.get("prefixes"), seed=init_from.get("seed", 0))
    if init_from.get("load_normalizer", True):
        newest_with_stats = [f for f in folders if (f / NORMALIZER_FILE).is_file()]
        if not newest_with_stats:
            raise FileNotFoundError(f"{init_from['folder']}: no {NORMALIZER_FILE} in any checkpoint; set "
                                    "init_from.load_normalizer: False to re-estimate the statistics.")
        load_normalizer(normalizer, newest_with_stats[-1])
    logger.info("Stage hand-off: averaged %d checkpoint(s) of %s", len(folders), init_from["folder"])
    return folders


def average_into(checkpointer, model, normalizer, count, key=None, mode="min"):
    """Load the average of the `count` best end-of-epoch checkpoints (by `key`, or the latest) for testing.

    The chosen folders are recorded in the save folder (`tested_checkpoints.yaml`), so that inference serves
    exactly the model this test scores (modules/checkpoint.py `served_checkpoints`)."""
    selection = {} if key is None else {f"{mode}_key": key}
    checkpoints = checkpointer.find_checkpoints(
        ckpt_predicate=lambda ckpt: ckpt.meta.get("end-of-epoch", False),
        max_num_checkpoints=count, **selection)
    if not checkpoints:
        raise FileNotFoundError(f"{checkpointer.checkpoints_dir}: no end-of-epoch checkpoint to test; train first.")
    state = average_state_dicts(read_model_state(ckpt.path) for ckpt in checkpoints)
    check_state_dict(model.state_dict(), state, source=str(checkpointer.checkpoints_dir))
    with torch.no_grad():
        model.load_state_dict(state)
    load_normalizer(normalizer, checkpoints[0].path)
    selection = f"{count} {'latest' if key is None else f'best by {mode} {key}'}"
    if if_main_process():
        record_tested_checkpoints(checkpointer.checkpoints_dir, [ckpt.path for ckpt in checkpoints],
                                  checkpoints[0].path, selection)
    logger.info("Testing the average of %d checkpoint(s): %s", len(checkpoints),
                ", ".join(ckpt.path.name for ckpt in checkpoints))
    return checkpoints
