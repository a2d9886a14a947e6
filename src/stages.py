"""What the four `train_stageK.py` scripts share: manifests -> SpeechBrain datasets, and the run sequence.

Per sample, the data pipeline turns a manifest row (docs/corpus.md columns) into token ids for
src/sequence.py: the user prompt (instruction drawn per sample from the stage's family, spec §2), the text
after the speech, the state token (stages 3-4, from the explicit `state` column) and the response.
Instructions are drawn from a generator owned by the pipeline: random in training, fixed per utterance id for
validation/test so that their metrics are comparable between epochs.
"""
import csv
import dataclasses
import json
import logging
import os
import pathlib
import random
import zlib

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.dataio.sampler import DynamicBatchSampler
from speechbrain.utils.distributed import ddp_barrier, run_on_main

from src import prompts
from src.audio import MIN_SECONDS, load_audio
from src.data_prep import STATE_EMPTY, STATE_IGNORE, STATE_INCOMPLETE, STATE_RESPOND, TASK_ASR, prepare_manifests

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("ID", "duration", "wav", "task", "state", "response")
STATE_TOKEN_OF = {STATE_EMPTY: prompts.RESPONSE, STATE_RESPOND: prompts.RESPONSE,
                  STATE_INCOMPLETE: prompts.INCOMPLETE, STATE_IGNORE: prompts.IGNORE}


def read_manifest(csv_path, tasks=None):
    """CSV -> DynamicItemDataset; relative `wav` paths are resolved against the CSV's folder (docs/corpus.md)."""
    csv_path = pathlib.Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: manifest not found; run data preparation (src/data_prep.py) or fix "
                                "the *_csv path in the stage YAML.")
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in REQUIRED_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; expected {list(REQUIRED_COLUMNS)} "
                             "(see docs/corpus.md).")
        rows = [row for row in reader if tasks is None or row["task"] in tasks]
    data = {row["ID"]: _dataset_entry(row, csv_path) for row in rows}
    data = _without_too_short(data, csv_path)
    if not data:
        raise ValueError(f"{csv_path}: no rows{'' if tasks is None else f' with task in {list(tasks)}'}.")
    return DynamicItemDataset(data)


def _without_too_short(data, csv_path):
    """Drop clips shorter than one adapter position (the audio loader refuses them, which would stop training
    mid-epoch instead of at start-up); data preparation's `min_duration` avoids them in the first place."""
    too_short = [utt_id for utt_id, entry in data.items() if entry["duration"] < MIN_SECONDS]
    if too_short:
        logger.warning("%s: skipping %d clip(s) shorter than %.1f s, e.g. %s", csv_path, len(too_short),
                       MIN_SECONDS, too_short[:3])
    return {utt_id: entry for utt_id, entry in data.items() if entry["duration"] >= MIN_SECONDS}


def _dataset_entry(row, csv_path):
    """One manifest row as a dataset entry: float duration, absolute wav path, known state."""
    if row["state"] not in STATE_TOKEN_OF:
        raise ValueError(f"{csv_path}: row {row['ID']} has state {row['state']!r}; expected one of "
                         f"{sorted(STATE_TOKEN_OF)}.")
    entry = {key: value for key, value in row.items() if key != "ID"}
    try:
        entry["duration"] = float(row["duration"])
    except (TypeError, ValueError):
        raise ValueError(f"{csv_path}: row {row['ID']} has duration {row['duration']!r}; expected seconds as a "
                         "number (re-run data preparation).") from None
    entry["wav"] = str((csv_path.parent / row["wav"]).resolve())
    entry["context"] = _resolved_context(row.get("context"), csv_path, row["ID"])
    entry["context_duration"] = sum(float(turn.get("duration", 0.0)) for turn in json.loads(entry["context"]))
    return entry


def _resolved_context(text, csv_path, utt_id):
    """The optional `context` column (multi-turn stages 3-4, docs/corpus.md): a JSON list of earlier turns
    {"wav": audio relative to the CSV, "reply": the reply as said, "duration": seconds (optional; dynamic
    batching counts the earlier turns' audio too)}, returned as JSON with absolute paths."""
    if not text:
        return "[]"
    try:
        turns = json.loads(text)
        resolved = [{"wav": str((csv_path.parent / turn["wav"]).resolve()), "reply": str(turn["reply"]),
                     "duration": float(turn.get("duration", 0.0))} for turn in turns]
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"{csv_path}: row {utt_id} has context {text[:80]!r}; expected a JSON list of "
                         '{"wav": ..., "reply": ...} objects (docs/corpus.md).') from None
    return json.dumps(resolved)


def instruction_sentences(stage, task):
    """Stage 1: the reference's alignment sentences; later stages: ASR (paper A.1) or QA (A.2) by task."""
    if stage == 1:
        return prompts.STAGE1_SENTENCES
    return prompts.ASR_SENTENCES if task == TASK_ASR else prompts.QA_SENTENCES


class TextIds:
    """Token ids of one sample's texts for a stage; the tokenizer and stage are fixed at construction."""

    def __init__(self, tokenizer, stage):
        self.tokenizer = tokenizer
        self.stage = stage
        self.suffix_ids = self.encode(prompts.suffix_for(stage))
        self.assistant_ids = self.encode(prompts.ASSISTANT_PROMPT)
        self.join_ids = self.encode(prompts.TURN_JOIN)  # multi-turn (src/sequence.py)
        self.reply_head_ids = self.encode(prompts.ANSWERED_TURN_HEAD)

    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prefix(self, task, rng):
        return self.encode(prompts.user_prompt(rng.choice(instruction_sentences(self.stage, task))))

    def state_id(self, state):
        return self.tokenizer.convert_tokens_to_ids(STATE_TOKEN_OF[state])


def add_pipelines(dataset, text_ids, train, seed):
    """Attach audio reading and the text ids; instructions random in training, fixed per id otherwise."""
    train_rng = random.Random(seed)

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return load_audio(wav)  # (N,) 16 kHz mono float32

    @sb.utils.data_pipeline.takes("id", "task", "state", "response")
    @sb.utils.data_pipeline.provides("prefix_ids", "suffix_ids", "state_id", "response_ids")
    def text_pipeline(utt_id, task, state, response):
        rng = train_rng if train else random.Random(zlib.crc32(utt_id.encode()))
        yield text_ids.prefix(task, rng)
        yield text_ids.suffix_ids
        yield text_ids.state_id(state)
        yield text_ids.encode(response)

    @sb.utils.data_pipeline.takes("id", "context")
    @sb.utils.data_pipeline.provides("context_wavs", "context_turns")
    def context_pipeline(utt_id, context):
        """Earlier turns of a multi-turn row (stages 3-4 only): their audio, (prompt ids, reply ids)."""
        turns = json.loads(context) if text_ids.stage >= 3 else []
        rng = train_rng if train else random.Random(zlib.crc32(utt_id.encode()) + 1)
        yield [load_audio(turn["wav"]) for turn in turns]
        yield [(text_ids.prefix("qa", rng), text_ids.encode(turn["reply"])) for turn in turns]

    sb.dataio.dataset.add_dynamic_item([dataset], audio_pipeline)
    sb.dataio.dataset.add_dynamic_item([dataset], text_pipeline)
    keys = ["id", "task", "response", "sig", "prefix_ids", "suffix_ids", "state_id", "response_ids"]
    if all("context" in entry for entry in dataset.data.values()):  # read_manifest always gives it
        sb.dataio.dataset.add_dynamic_item([dataset], context_pipeline)
        keys += ["context_wavs", "context_turns"]
    sb.dataio.dataset.set_output_keys([dataset], keys)
    return dataset


def make_datasets(hparams, text_ids):
    """train / valid / {test name: dataset} from the manifest paths in the YAML (after data preparation)."""
    tasks = hparams.get("tasks")
    seed = hparams["seed"]

    def load(path, train=False):
        return add_pipelines(read_manifest(path, tasks), text_ids, train, seed)

    train = load(hparams["train_csv"], train=True)
    valid = load(hparams["valid_csv"])
    tests = {pathlib.Path(path).stem: load(path) for path in hparams["test_csvs"]}
    return train, valid, tests


def loader_kwargs(hparams, dataset, name):
    """DataLoader options; dynamic batching by duration when the YAML has `<name>_batch_sampler`."""
    kwargs = dict(hparams[f"{name}_dataloader_opts"])
    sampler_opts = hparams.get(f"{name}_batch_sampler")
    if sampler_opts is not None:
        kwargs["batch_sampler"] = DynamicBatchSampler(
            dataset, length_func=lambda row: row["duration"] + row.get("context_duration", 0.0), **sampler_opts)
    return kwargs


def prepare_data(hparams):
    """Run data preparation on the main process when the YAML asks for it (skipped when already done)."""
    prep = hparams.get("data_prep")
    if prep is None:
        return
    run_on_main(prepare_manifests, kwargs=dict(prep))


def per_process_device(device):
    """The device this process trains on: under torchrun a bare "cuda" means cuda:LOCAL_RANK.

    SpeechBrain maps a bare "cuda" to cuda:0 in every process, which puts all ranks on GPU 0 (NCCL then hangs
    at the first collective); with no --device it already infers cuda:LOCAL_RANK, and we make "cuda" agree.
    """
    local_rank = os.environ.get("LOCAL_RANK")
    if device == "cuda" and local_rank is not None:
        return f"cuda:{local_rank}"
    return device


def run_stage(brain_class, argv, usage=None):
    """The fixed SpeechBrain sequence: arguments -> YAML -> DDP group -> experiment folder -> data -> fit -> test.

    `usage` (the stage script's docstring) is printed before SpeechBrain's own option list on --help.
    """
    if usage and {"-h", "--help"} & set(argv):
        print(usage)
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    if run_opts.get("device") is not None:  # RunOptions is a frozen dataclass
        run_opts = dataclasses.replace(run_opts, device=per_process_device(run_opts.device))
    sb.utils.distributed.ddp_init_group(run_opts)
    with open(hparams_file, encoding="utf-8") as handle:
        hparams = load_hyperpyyaml(handle, overrides)
    sb.create_experiment_directory(experiment_directory=hparams["output_folder"],
                                   hyperparams_to_save=hparams_file, overrides=overrides)
    prepare_data(hparams)
    brain = brain_class(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                        run_opts=run_opts, checkpointer=hparams["checkpointer"])
    train, valid, tests = make_datasets(hparams, brain.text_ids)
    train_kwargs = loader_kwargs(hparams, train, "train")
    if "batch_sampler" in train_kwargs:
        brain.train_sampler = train_kwargs["batch_sampler"]  # new batches each epoch (DDP wraps it again)
    brain.fit(hparams["epoch_counter"], train, valid, train_loader_kwargs=train_kwargs,
              valid_loader_kwargs=loader_kwargs(hparams, valid, "valid"))
    for name, dataset in tests.items():
        logger.info("Testing on %s", name)
        brain.evaluate(dataset, test_loader_kwargs=loader_kwargs(hparams, dataset, "test"))
    end_process_group()
    return brain


def end_process_group():
    """Leave the DDP group together: left to interpreter exit, gloo's threads can abort the process (SIGABRT,
    "terminate called without an active exception") after a run that otherwise succeeded."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        ddp_barrier()
        torch.distributed.destroy_process_group()
