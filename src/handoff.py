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

Every checkpoint also holds a stage record (`stage_record.ckpt`, YAML): the stage, the model configuration, the
vocabulary size, a hash of each manifest and the run's configuration. Before anything is trained,
`check_handoff` compares the record of this run with

* the previous stage's newest record (stage K must start from stage K-1 with the same network), and
* this output folder's own newest record when it already holds checkpoints (a resumed or re-run stage must
  use the same data and configuration; otherwise the old checkpoints would be resumed, or only tested, on
  data and settings they were not trained with),

and refuses a mismatch, with what differs, unless `--force` is given.
"""
import hashlib
import logging
import pathlib

import torch
import yaml
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

from speechbrain.utils.distributed import if_main_process

from modules.checkpoint import (NORMALIZER_FILE, average_state_dicts, check_state_dict, load_normalizer,
                                load_reference_checkpoint, read_model_state, record_tested_checkpoints)

logger = logging.getLogger(__name__)
INIT_KEYS = {"folder", "prefixes", "grow_vocabulary", "load_normalizer", "seed"}
RECORD_NAME = "stage_record"  # the recoverable's name: stage_record.ckpt in every CKPT folder
# Command-line overrides that do not change what a run trains on or how (so a resume may change them): paths
# whose content is hashed separately (manifests), the epoch limit (training longer is a resume), test options.
RUN_ONLY_KEYS = {"data_folder", "output_folder", "previous_output_folder", "number_of_epochs", "data_prep",
                 "train_csv", "valid_csv", "test_csvs", "test_max_new_tokens", "test_average", "keep_checkpoints"}
# Model keys that legitimately differ between stages (the vocabulary grows at stage 3) or do not shape the net.
STAGE_VARIANT_MODEL_KEYS = {"num_state_tokens", "vocab_size", "seed", "lm_source", "lm_device", "freeze_lm"}


class HandoffError(ValueError):
    """A previous stage or an output folder that does not fit this run; --force overrides it."""


def _plain(value):
    """The YAML-able part of a resolved hparams value (numbers, strings, and dicts/lists of them)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        kept = {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
        return {k: v for k, v in kept.items() if v is not _SKIP}
    if isinstance(value, (list, tuple)):
        kept = [_plain(v) for v in value]
        return [v for v in kept if v is not _SKIP]
    return _SKIP


_SKIP = object()


def file_hash(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def stage_record(hparams, hparams_file, overrides, manifests):
    """What this run is: stage, model configuration, vocabulary rows, manifest hashes, configuration."""
    overrides = yaml.safe_load(overrides) if isinstance(overrides, str) and overrides.strip() else overrides
    config = {k: v for k, v in (overrides or {}).items() if k not in RUN_ONLY_KEYS}
    model = _plain(hparams.get("model_hparams") or {})
    return {"stage": hparams.get("stage"),
            "model": model,
            "vocab_size": _vocabulary_rows(hparams.get("model")),
            "data": {pathlib.Path(path).name: file_hash(path) for path in manifests},
            "config": {"hparams_file": pathlib.Path(hparams_file).name, "hparams_sha256": file_hash(hparams_file),
                       "overrides": _plain(config)}}


def _vocabulary_rows(model):
    """Rows of the LM's embedding matrix (None for a network without one, e.g. an ASR-only recipe)."""
    try:
        return int(model.lm.model.get_input_embeddings().weight.shape[0])
    except AttributeError:
        return None


class StageRecord:
    """Checkpoint recoverable holding `stage_record`'s dict (saved as YAML; loading leaves this run's own)."""

    def __init__(self, record):
        self.record = record

    @mark_as_saver
    def save(self, path):
        pathlib.Path(path).write_text(yaml.safe_dump(self.record, sort_keys=True))

    @mark_as_loader
    def load(self, path, end_of_epoch):
        del path, end_of_epoch  # read by check_handoff before training; this run's record is what gets saved


register_checkpoint_hooks(StageRecord)


def newest_record(save_folder):
    """(CKPT folder, record or None) of the newest checkpoint in `save_folder`, or (None, None) if it has none."""
    folders = sorted(p for p in pathlib.Path(save_folder).glob("CKPT+*") if (p / "CKPT.yaml").is_file())
    if not folders:
        return None, None
    file = folders[-1] / f"{RECORD_NAME}.ckpt"
    return folders[-1], (yaml.safe_load(file.read_text()) if file.is_file() else None)


def _differences(old, new, prefix=""):
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _model_differences(old, new):
    strip = lambda model: {k: v for k, v in (model or {}).items() if k not in STAGE_VARIANT_MODEL_KEYS}  # noqa: E731
    return _differences(strip(old), strip(new))


def check_handoff(record, hparams, force=False):
    """Refuse (HandoffError) a run whose output folder or previous stage does not fit `record`; with `force`,
    log the problems as warnings and go on. Returns the list of problems found."""
    save_folder = hparams["checkpointer"].checkpoints_dir
    problems = _own_folder_problems(record, save_folder)
    folder = (hparams.get("init_from") or {}).get("folder")
    if not problems and folder is not None and not newest_record(save_folder)[0]:
        problems = _previous_stage_problems(record, folder)
    if problems and not force:
        raise HandoffError("\n".join(problems) + "\nPass --force to go on anyway.")
    for problem in problems:
        logger.warning("--force: going on although %s", problem)
    return problems


def _own_folder_problems(record, save_folder):
    folder, old = newest_record(save_folder)
    if folder is None:
        return []
    if old is None:
        logger.warning("%s has no stage record (written by an older version): cannot check that it was trained "
                       "on the same data and configuration.", folder)
        return []
    where = (f"{pathlib.Path(save_folder).parent} already holds checkpoints of a run with different")
    fix = ("Use a new --output_folder for a new run (or delete this one), or pass --force to resume these "
           "checkpoints with the new data/configuration.")
    problems = []
    data = _differences(old.get("data"), record["data"])
    if data:
        problems.append(f"{where} data (manifest: old hash -> new hash): {'; '.join(data)}. {fix}")
    config = _differences(old.get("config"), record["config"]) + _model_differences(old.get("model"),
                                                                                     record["model"])
    if config or old.get("stage") != record["stage"]:
        config = config or [f"stage: {old.get('stage')} -> {record['stage']}"]
        problems.append(f"{where} configuration: {'; '.join(config)}. {fix}")
    return problems


def _previous_stage_problems(record, init_folder):
    folder, old = newest_record(init_folder)
    if folder is None:
        return []  # load_previous_stage says that no checkpoint was found
    if old is None:
        logger.warning("%s has no stage record (an ASR checkpoint, or written by an older version): cannot check "
                       "its stage and network.", folder)
        return []
    problems = []
    if record["stage"] is None or old.get("stage") is None:
        return _model_problems(old, record, init_folder)
    if old.get("stage") != record["stage"] - 1:
        problems.append(f"{init_folder} holds stage-{old.get('stage')} checkpoints, but stage {record['stage']} "
                        f"starts from stage {record['stage'] - 1}. Pass --previous_output_folder=<the stage-"
                        f"{record['stage'] - 1} output folder> (the folder holding save/).")
    return problems + _model_problems(old, record, init_folder)


def _model_problems(old, record, init_folder):
    model = _model_differences(old.get("model"), record["model"])
    if not model:
        return []
    return [f"{init_folder} was trained with a different network: {'; '.join(model)}. Use the same model YAML "
            "and overrides as the previous stage."]


def load_previous_stage(init_from, model, normalizer):
    """Apply the YAML's `init_from` to a freshly built model; returns the checkpoint folders used."""
    unknown = set(init_from) - INIT_KEYS
    if unknown:
        raise ValueError(f"init_from has unknown keys {sorted(unknown)}; allowed: {sorted(INIT_KEYS)}.")
    if init_from.get("folder") is None:
        logger.info("init_from.folder is null: starting from the model YAML's weights.")
        return []
    try:
        folders = load_reference_checkpoint(
            model, init_from["folder"], normalizer=None, grow_vocabulary=init_from.get("grow_vocabulary", False),
            prefixes=init_from.get("prefixes"), seed=init_from.get("seed", 0))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"Previous stage: {error} In the stage YAMLs init_from.folder is "
                                "<previous_output_folder>/save: pass --previous_output_folder=<the previous "
                                "stage's output folder>, the folder that holds save/ (not save/ itself).") from error
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
