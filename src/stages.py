"""What the four `train_stageK.py` scripts share: manifests -> SpeechBrain datasets, and the run sequence.

Per sample, the data pipeline turns a manifest row (docs/corpus.md columns) into token ids for
src/sequence.py: the user prompt (instruction drawn per sample from the stage's family, spec §2), the text
after the speech, the state token (stages 3-4, from the explicit `state` column) and the response.
Instructions are drawn by `PromptDraws`: in training from a generator seeded with (seed, epoch, utterance id),
fixed per utterance id for validation/test so that their metrics are comparable between epochs.

A run ends cleanly on SIGINT/SIGTERM (src/run_control.py): during training after saving a checkpoint, with exit
status 128 + signal and no traceback. Intra-epoch checkpoints are on by default (every
`DEFAULT_CKPT_INTERVAL_MINUTES`, unless --ckpt_interval_minutes/--ckpt_interval_steps or the YAML say otherwise).
"""
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
from src.data_prep import (STATE_EMPTY, STATE_IGNORE, STATE_INCOMPLETE, STATE_RESPOND, TASK_ASR, as_transcription_row,
                            prepare_manifests)
from src.manifest_check import (CACHE_FILE, ManifestError, check_manifests, checked_manifests, read_rows,
                                resolve_wav, text_problems)
from src.handoff import RECORD_NAME, StageRecord, check_handoff, stage_record
from src.run_control import GracefulStop, StopNow, TrainingStopped

logger = logging.getLogger(__name__)
DEFAULT_CKPT_INTERVAL_MINUTES = 15.0  # intra-epoch checkpoints unless the command line or the YAML set one
RUN_FLAGS = ("--force", "--skip_bad_rows")  # our own switches, taken out before SpeechBrain parses the rest

STATE_TOKEN_OF = {STATE_EMPTY: prompts.RESPONSE, STATE_RESPOND: prompts.RESPONSE,
                  STATE_INCOMPLETE: prompts.INCOMPLETE, STATE_IGNORE: prompts.IGNORE}


def read_manifest(csv_path, tasks=None, exclude_lines=(), transcripts=False):
    """CSV -> DynamicItemDataset; relative `wav` paths are resolved against the CSV's folder (docs/corpus.md).

    The text fields are checked here (src/manifest_check.py, every problem at once); the audio files were
    checked before (`check_stage_manifests`). `exclude_lines`: CSV lines to leave out (--skip_bad_rows).
    `transcripts`: every row is read as an ASR row (`as_transcription`).
    """
    csv_path = pathlib.Path(csv_path)
    rows = [(line, row) for line, row in read_rows(csv_path) if line not in exclude_lines]
    seen_ids = {}
    problems = [problem for line, row in rows for problem in text_problems(csv_path, line, row, seen_ids)]
    if problems:
        raise ManifestError(problems, header=f"{csv_path}: {len(problems)} problem(s)")
    data = {row["ID"]: _dataset_entry(row, csv_path) for _, row in rows if tasks is None or row["task"] in tasks}
    if transcripts:
        data = as_transcription(data, csv_path)
    data = _without_too_short(data, csv_path)
    if not data:
        raise ValueError(f"{csv_path}: no rows{'' if tasks is None else f' with task in {list(tasks)}'}.")
    return DynamicItemDataset(data)


def as_transcription(data, csv_path):
    """Every row as an ASR row: its transcript (`wrd`) is the target, with no state and no earlier turns.

    The stage YAML's `transcripts_as_targets` (alignment, stage 1): a spoken question, a cut-off question or
    background talk is as good an alignment example as a read sentence, and the ASR rows alone are a third of
    the speedrun's corpus (docs/demo_model.md). Rows without a transcript are left out.
    """
    rows = {utt_id: {**as_transcription_row(entry), "context": "[]", "context_duration": 0.0}
            for utt_id, entry in data.items()}
    untranscribed = [utt_id for utt_id, row in rows.items() if not row["response"]]
    if untranscribed:
        logger.warning("%s: %d row(s) without a transcript (`wrd`) left out, e.g. %s", csv_path,
                       len(untranscribed), untranscribed[:3])
    return {utt_id: row for utt_id, row in rows.items() if row["response"]}


def _without_too_short(data, csv_path):
    """Drop clips shorter than one adapter position (the audio loader refuses them, which would stop training
    mid-epoch instead of at start-up); data preparation's `min_duration` avoids them in the first place."""
    too_short = [utt_id for utt_id, entry in data.items() if entry["duration"] < MIN_SECONDS]
    if too_short:
        logger.warning("%s: skipping %d clip(s) shorter than %.1f s, e.g. %s", csv_path, len(too_short),
                       MIN_SECONDS, too_short[:3])
    return {utt_id: entry for utt_id, entry in data.items() if entry["duration"] >= MIN_SECONDS}


def _dataset_entry(row, csv_path):
    """One (checked) manifest row as a dataset entry: float duration, absolute wav path, resolved context."""
    entry = {key: value for key, value in row.items() if key != "ID"}
    entry["duration"] = float(row["duration"])
    entry["wav"] = resolve_wav(csv_path, row["wav"])
    entry["context"] = _resolved_context(row.get("context"), csv_path, row["ID"])
    entry["context_duration"] = sum(float(turn.get("duration", 0.0)) for turn in json.loads(entry["context"]))
    return entry


def stage_manifests(hparams):
    """The manifests a stage reads: train, valid, then each test CSV."""
    return [hparams["train_csv"], hparams["valid_csv"], *hparams["test_csvs"]]


def check_stage_manifests(hparams, skip_bad_rows=False):
    """Check every row the stage will use before anything is trained (src/manifest_check.py).

    The audio is decoded once, on the main process, into the cache in the output folder; every process then
    reads the verdicts from it. Returns {csv path: {lines to leave out}} (only with `skip_bad_rows`).
    """
    kwargs = dict(csv_paths=stage_manifests(hparams), tasks=hparams.get("tasks"),
                  cache_file=pathlib.Path(hparams["output_folder"]) / CACHE_FILE)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        run_on_main(check_manifests, kwargs=kwargs)
    return checked_manifests(**kwargs, skip_bad_rows=skip_bad_rows)


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


class PromptDraws:
    """The generator each sample's instruction is drawn from.

    Training: seeded with (seed, epoch, utterance id), so a sample gets a fresh instruction every epoch and the
    same one whenever that epoch is replayed: a resumed run (bit-exact resume needs no pipeline state) and
    DataLoader workers (which only get a copy of the parent's generators) draw exactly what a single process
    would. `epoch` is set by the Brain when each training epoch starts. Otherwise: fixed per utterance id.
    """

    def __init__(self, seed, train):
        self.seed = seed
        self.train = train
        self.epoch = 0

    def rng(self, utt_id, offset=0):
        """A generator for one sample; `offset` gives another, independent one for the same sample (its
        earlier turns' instructions)."""
        key = f"{self.seed}:{self.epoch}:{utt_id}" if self.train else utt_id
        return random.Random(zlib.crc32(key.encode()) + offset)


def add_pipelines(dataset, text_ids, draws):
    """Attach audio reading and the text ids; instructions drawn from `draws` (a PromptDraws)."""

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return load_audio(wav)  # (N,) 16 kHz mono float32

    @sb.utils.data_pipeline.takes("id", "task", "state", "response")
    @sb.utils.data_pipeline.provides("prefix_ids", "suffix_ids", "state_id", "response_ids")
    def text_pipeline(utt_id, task, state, response):
        yield text_ids.prefix(task, draws.rng(utt_id))
        yield text_ids.suffix_ids
        yield text_ids.state_id(state)
        yield text_ids.encode(response)

    @sb.utils.data_pipeline.takes("id", "context")
    @sb.utils.data_pipeline.provides("context_wavs", "context_turns")
    def context_pipeline(utt_id, context):
        """Earlier turns of a multi-turn row (stages 3-4 only): their audio, (prompt ids, reply ids)."""
        turns = json.loads(context) if text_ids.stage >= 3 else []
        rng = draws.rng(utt_id, offset=1)  # not the same generator as the sample's own instruction
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


def make_datasets(hparams, text_ids, train_draws, exclude=None):
    """train / valid / {test name: dataset} from the manifest paths in the YAML (after data preparation);
    `exclude`: {csv path: {lines}} to leave out (check_stage_manifests with --skip_bad_rows)."""
    tasks = hparams.get("tasks")
    transcripts = hparams.get("transcripts_as_targets", False)
    eval_draws = PromptDraws(hparams["seed"], train=False)
    exclude = exclude or {}

    def load(path, draws):
        rows = read_manifest(path, tasks, exclude.get(str(pathlib.Path(path)), ()), transcripts)
        return add_pipelines(rows, text_ids, draws)

    train = load(hparams["train_csv"], train_draws)
    valid = load(hparams["valid_csv"], eval_draws)
    tests = {pathlib.Path(path).stem: load(path, eval_draws) for path in hparams["test_csvs"]}
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


def split_run_flags(argv):
    """(argv without our switches, {flag name: given}); `--force` and `--skip_bad_rows` take no value."""
    flags = {flag.lstrip("-"): False for flag in RUN_FLAGS}
    rest = []
    for arg in argv:
        name, _, value = arg.partition("=")
        if name in RUN_FLAGS:
            if value not in ("", "True", "true", "False", "false"):
                raise SystemExit(f"{name} takes no value (got {arg!r}); write {name} alone.")
            flags[name.lstrip("-")] = value.lower() != "false"
        else:
            rest.append(arg)
    return rest, flags


def with_checkpoint_interval(run_opts, hparams):
    """Intra-epoch checkpoints on by default (every DEFAULT_CKPT_INTERVAL_MINUTES); an interval given on the
    command line wins over the YAML's, and asking for steps turns the default minutes off (SpeechBrain refuses
    both at once)."""
    given = run_opts.overridden_args
    minutes, steps = "ckpt_interval_minutes", "ckpt_interval_steps"
    if steps in given and minutes not in given:
        return dataclasses.replace(run_opts, ckpt_interval_minutes=0, overridden_args=given | {minutes})
    if given & {minutes, steps} or hparams.get(minutes) is not None or hparams.get(steps) is not None:
        return run_opts
    return dataclasses.replace(run_opts, ckpt_interval_minutes=DEFAULT_CKPT_INTERVAL_MINUTES,
                               overridden_args=given | {minutes})


def parse_run_arguments(argv, usage=None):
    """SpeechBrain's (hparams_file, run_opts, overrides) for a training script (stages, train_asr.py,
    train_lm.py); ``usage`` (the script's docstring) is printed before SpeechBrain's option list on --help."""
    if usage and {"-h", "--help"} & set(argv):
        print(usage)
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    if run_opts.get("device") is not None:  # RunOptions is a frozen dataclass
        run_opts = dataclasses.replace(run_opts, device=per_process_device(run_opts.device))
    return hparams_file, run_opts, overrides


def start_experiment(hparams_file, run_opts, overrides):
    """DDP group -> YAML -> experiment folder (with the YAML saved in it) for ASR and LM pre-training; the
    hparams. (`_run_stage` does the same with its checkpoint interval read from the YAML in between.)"""
    sb.utils.distributed.ddp_init_group(run_opts)
    with open(hparams_file, encoding="utf-8") as handle:
        hparams = load_hyperpyyaml(handle, overrides)
    sb.create_experiment_directory(experiment_directory=hparams["output_folder"],
                                   hyperparams_to_save=hparams_file, overrides=overrides)
    return hparams


def run_stage(brain_class, argv, usage=None):
    """The fixed SpeechBrain sequence: arguments -> YAML -> DDP group -> experiment folder -> data -> fit -> test.

    `usage` (the stage script's docstring) is printed before SpeechBrain's own option list on --help.
    A stop signal ends the run with SystemExit(128 + signal) after a one-line message (src/run_control.py).
    """
    argv, flags = split_run_flags(argv)
    hparams_file, run_opts, overrides = parse_run_arguments(argv, usage)
    stop = GracefulStop()
    with stop.installed():
        try:
            return _run_stage(brain_class, hparams_file, run_opts, overrides, flags, stop)
        except (TrainingStopped, StopNow) as stopped:
            _exit_after_stop(stopped)


def _exit_after_stop(stopped):
    """One line instead of a KeyboardInterrupt traceback; exit status 128 + signal, as a shell reports it."""
    name = str(stopped)
    if isinstance(stopped, TrainingStopped):
        logger.warning("Stopped by %s after saving a checkpoint; run the same command again to resume.", name)
    else:
        logger.warning("Stopped by %s; nothing was being trained or the stop was forced, so nothing new was "
                       "saved. Run the same command again to resume from the last checkpoint.", name)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # no barrier: the other processes may be stopping elsewhere
    raise SystemExit(128 + stopped.signum)


def _run_stage(brain_class, hparams_file, run_opts, overrides, flags, stop):
    sb.utils.distributed.ddp_init_group(run_opts)
    with open(hparams_file, encoding="utf-8") as handle:
        hparams = load_hyperpyyaml(handle, overrides)
    run_opts = with_checkpoint_interval(run_opts, hparams)
    sb.create_experiment_directory(experiment_directory=hparams["output_folder"],
                                   hyperparams_to_save=hparams_file, overrides=overrides)
    prepare_data(hparams)
    exclude = check_stage_manifests(hparams, flags["skip_bad_rows"])
    record = stage_record(hparams, hparams_file, overrides, stage_manifests(hparams))
    check_handoff(record, hparams, force=flags["force"])
    hparams["checkpointer"].add_recoverable(RECORD_NAME, StageRecord(record), optional_load=True)
    brain = brain_class(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                        run_opts=run_opts, checkpointer=hparams["checkpointer"])
    brain.stop = stop
    brain.prompt_draws = PromptDraws(hparams["seed"], train=True)
    train, valid, tests = make_datasets(hparams, brain.text_ids, brain.prompt_draws, exclude)
    return fit_and_test(brain, hparams, train, valid, tests)


def fit_and_test(brain, hparams, train, valid, tests):
    """Train on ``train`` (validating on ``valid``), evaluate each of ``tests``, then leave the DDP group.
    Shared by the stages and ASR pre-training (src/asr_pretraining.py)."""
    train_kwargs = loader_kwargs(hparams, train, "train")
    if "batch_sampler" in train_kwargs:
        brain.train_sampler = train_kwargs["batch_sampler"]  # new batches each epoch (DDP wraps it again)
    brain.fit(hparams["epoch_counter"], train, valid, train_loader_kwargs=train_kwargs,
              valid_loader_kwargs=loader_kwargs(hparams, valid, "valid"))
    for name, dataset in tests.items():
        logger.info("Testing on %s", name)
        brain.test_name = name  # names the file the test's transcripts are written to (DuplexBrain)
        brain.evaluate(dataset, test_loader_kwargs=loader_kwargs(hparams, dataset, "test"))
    end_process_group()
    return brain


def end_process_group():
    """Leave the DDP group together: left to interpreter exit, gloo's threads can abort the process (SIGABRT,
    "terminate called without an active exception") after a run that otherwise succeeded."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        ddp_barrier()
        torch.distributed.destroy_process_group()
