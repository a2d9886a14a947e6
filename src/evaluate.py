"""Evaluate any DuplexMamba checkpoint: transcripts, state tokens, answers, and whole duplex conversations.

    python -m src.evaluate duplex/duplex_demo.yaml --manifest data/synth/test.csv --out reports/demo-test
    python -m src.evaluate duplex/duplex_demo.yaml --checkpoint results/demo/demo_stage4/3407/save \\
        --manifest data/synth/test.csv --manifest data/synth/test-engine.csv --out reports/stage4
    python -m src.evaluate duplex/duplex_demo.yaml --wavs example/*.wav --out reports/example
    python -m src.evaluate duplex/duplex_demo.yaml --scripts data/synth/conversations --out reports/conversations
    python -m src.evaluate duplex/duplex.yaml --checkpoint SAVE --manifest test.csv --metrics wer --device cuda ...

The model is an inference YAML (its `net:` and `duplex:` blocks) plus, optionally, `--checkpoint` (a save folder,
whose CKPT+* are averaged, or one CKPT folder); no stage is re-run. Stage-1/2 checkpoints (50278 vocabulary rows)
have no state tokens: only `--metrics wer` applies to them, and asking for more is an error before any work.

On a manifest (the CSV of src/data_prep.py and src/corpus: ID, wav, wrd, task, state, response, answer; wav
relative to the CSV's folder), all greedy and deterministic:

- wer:    WER and CER of the greedy transcript of every `asr` row (and of the tasks in --asr-tasks) under the ASR
          prompt "<|user|>\\n{--asr-instruction}\\n<|beginofspeech|>" speech "<|endofspeech|><|endofuser|>
          \\n<|assistant|>\\n" (the layout of stages 1-2 and of stages 3-4's ASR rows), against `wrd`; both sides
          lower-cased, numbers spelled out, punctuation dropped (src/corpus/normalize.transcript).
- state:  on `qa` and `state` rows, under the inference prompt (what the duplex engine hears): the argmax among
          the three state tokens after "<|endofspeech|>", against the row's `state` column (respond ->
          <|endofuser|>, incomplete, ignore). Precision, recall and F1 per class, macro-F1, a confusion matrix
          (confusion.png).
- answer: on `qa` rows with an `answer` key: the greedy reply after the predicted state token is right when it
          contains the key (normalised, whole words): "The capital of France is Paris." contains "paris".

`--wavs` takes audio files named question_*, interrupt_*, incomplete_*, ignore_* (example/) and scores the state.

On a folder of conversation scripts (duplex/script.py format; src.corpus writes them under conversations/), each
script is played through a duplex session with the YAML's `duplex:` settings (override: --listener-context,
--greedy-states) and scored:

- slice state accuracy: every speech slice with an `expect:` token against the token the session predicted;
- answer accuracy: for each event with `answer:` (or `reply:`, whose whole text is then the key), the reply the
  session starts between that event's first slice and the next audio event must contain the key; with
  `reply_kind: incomplete` it must be one of the paper's appendix B.1 replies;
- response latency: from the end of the user's speech in the answered event (its last sample above -40 dBFS) to
  the end of the slice in which the first reply text is emitted, in stream time (a slice's text exists once
  the slice has arrived and been processed); the mean processing time of a slice is reported beside it.

Writes to --out (which must not lie inside a training folder: one with CKPT+* checkpoints, hyperparams.yaml or
train_log.txt, or the checkpoint's experiment folder): report.md, report.json, confusion.png (state),
predictions.jsonl (one line per utterance or slice). Runs on CPU or CUDA (--device; default: the YAML's).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import pathlib
import sys
import time
from dataclasses import dataclass, field

import torch
import yaml
from tqdm import tqdm

from src import prompts
from src.corpus.normalize import transcript as normalise

METRICS = ("wer", "state", "answer")
STATE_OF_COLUMN = {"empty": prompts.RESPONSE, "respond": prompts.RESPONSE, "incomplete": prompts.INCOMPLETE,
                   "ignore": prompts.IGNORE}
STATE_OF_FILE_PREFIX = {"question": prompts.RESPONSE, "interrupt": prompts.RESPONSE,
                        "incomplete": prompts.INCOMPLETE, "ignore": prompts.IGNORE}
STATE_NAMES = {prompts.RESPONSE: "respond", prompts.INCOMPLETE: "incomplete", prompts.IGNORE: "ignore"}
COLUMNS_OF_METRIC = {"wer": ("wrd",), "state": ("state",), "answer": ("answer",)}
BASE_COLUMNS = ("ID", "wav", "task")
STATE_TASKS = ("qa", "state")
NO_STATE = "(none)"  # a speech slice the session did not probe (no LM position)
SPEECH_DBFS = -40.0  # level above which a sample counts as speech (latency)
TRAINING_MARKERS = ("hyperparams.yaml", "train_log.txt", "model.ckpt")


class EvaluationError(ValueError):
    """Bad input found before any work: the message names the file and what to do."""


# ================================================================== inputs
@dataclass(frozen=True)
class Utterance:
    """One audio file and what it should give."""

    utt_id: str
    wav: pathlib.Path
    task: str
    words: str = ""  # `wrd`: what was said
    state: str | None = None  # expected state token
    answer: str = ""  # answer key
    family: str = ""  # the speaker's voice family (TTS engine) from the corpus's speakers.csv; "" when unknown


def evenly_spaced(rows: list, limit: int | None) -> list:
    """At most `limit` rows, spread evenly over the manifest (so every part of it, and its mix of tasks and
    speakers, is represented), deterministically; all rows when `limit` is None or not smaller."""
    if limit is None or len(rows) <= limit:
        return rows
    return [rows[index * len(rows) // limit] for index in range(limit)]


def read_manifest(path: pathlib.Path, metrics, max_rows: int | None = None) -> list[Utterance]:
    """Rows of a manifest (at most `max_rows`, evenly spaced), checked for the columns the metrics need, known
    states and existing audio."""
    if not path.is_file():
        raise EvaluationError(f"{path}: manifest not found.")
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        columns = reader.fieldnames or []
        rows = list(reader)
    needed = list(BASE_COLUMNS) + [c for m in metrics for c in COLUMNS_OF_METRIC[m]]
    missing = [c for c in dict.fromkeys(needed) if c not in columns]
    if missing:
        skip = sorted({m for m in metrics for c in missing if c in COLUMNS_OF_METRIC[m]})
        raise EvaluationError(f"{path}: missing column(s) {missing} (has {columns}); add them, or leave out the "
                              f"metric(s) {skip} with --metrics {' '.join(m for m in metrics if m not in skip)}.")
    families = voice_families(path.parent)
    utterances = [_utterance(row, path, metrics, families) for row in evenly_spaced(rows, max_rows)]
    _check_audio_exists([u.wav for u in utterances], path)
    return utterances


def voice_families(folder: pathlib.Path) -> dict[str, str]:
    """Speaker id -> voice family (engine) from `speakers.csv` beside a src.corpus manifest; {} without one."""
    table = folder / "speakers.csv"
    if not table.is_file():
        return {}
    with open(table, newline="", encoding="utf-8") as stream:
        return {row["speaker"]: row["engine"] for row in csv.DictReader(stream) if row.get("speaker")}


def _utterance(row: dict, path: pathlib.Path, metrics, families: dict[str, str]) -> Utterance:
    state = row.get("state")
    if "state" in metrics and state not in STATE_OF_COLUMN:
        raise EvaluationError(f"{path}: row {row['ID']} has state {state!r}; expected one of "
                              f"{sorted(STATE_OF_COLUMN)}.")
    parts = pathlib.PurePath(row["wav"]).parts  # LibriSpeech layout: split/speaker/chapter/file
    family = families.get(parts[-3], "") if len(parts) >= 3 else ""
    return Utterance(row["ID"], (path.parent / row["wav"]).resolve(), row["task"], row.get("wrd") or "",
                     STATE_OF_COLUMN.get(state), row.get("answer") or "", family)


def _check_audio_exists(paths, source) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        raise EvaluationError(f"{source}: {len(missing)} audio file(s) not found, e.g. {shown}; wav paths are "
                              "relative to the manifest's folder.")


def wav_utterances(paths) -> list[Utterance]:
    """example/-style files: the expected state comes from the name's first word."""
    utterances = []
    for path in map(pathlib.Path, paths):
        prefix = path.stem.split("_")[0]
        if prefix not in STATE_OF_FILE_PREFIX:
            raise EvaluationError(f"{path}: cannot tell the expected state from the name; name it one of "
                                  f"{sorted(STATE_OF_FILE_PREFIX)}_<anything>.wav, or use a manifest.")
        utterances.append(Utterance(path.stem, path.resolve(), "state", state=STATE_OF_FILE_PREFIX[prefix]))
    _check_audio_exists([u.wav for u in utterances], "--wavs")
    return utterances


# ================================================================== the model under test
class GreedyModel:
    """A loaded network, decoded greedily: `transcribe(wavs)` under the ASR prompt, `respond(wavs)` -> (state
    token, reply) per waveform under the inference prompt. Both are CustomGenerator's jobs (the one two-pass
    implementation, run by the duplex scheduler) with greedy sampling, a batch of waveforms at a time: greedy
    results do not depend on the batch. The fake models of the tests have the same two methods."""

    def __init__(self, net: dict, tokenizer, num_state_tokens: int, max_new_tokens: int, asr_instruction: str,
                 batch_size: int = 1):
        from CustomGenerator import CustomGenerator, GenerationOptions
        from duplex.sampling import SamplingConfig

        greedy = SamplingConfig(greedy=True)
        options = GenerationOptions(state=greedy, reply=greedy, max_new_tokens=max_new_tokens)
        # state rows: one per utterance of a batch; a duplex session (scripts) needs a speaker, a listener, a probe
        self.generator = CustomGenerator(net, tokenizer, options, num_state_tokens=num_state_tokens,
                                         state_rows=max(batch_size, 3) + 1)
        self.runtime = self.generator.runtime  # shared with the duplex sessions of conversation scripts
        self.has_states = self.generator.has_states
        self.asr_instruction = asr_instruction

    def transcribe(self, wavs: list[torch.Tensor]) -> list[str]:
        return self.generator.transcribe_many(wavs, self.asr_instruction)

    def respond(self, wavs: list[torch.Tensor]) -> list[tuple[str, str]]:
        if not self.has_states:
            raise EvaluationError("this checkpoint has no state tokens (stages 1-2); use --metrics wer.")
        return [(result.state_token, result.reply) for result in self.generator.generate_many(wavs)]


def _raw_yaml(path: pathlib.Path) -> dict:
    """A YAML's plain keys without building anything (hyperpyyaml tags read as None)."""
    loader = type("IgnoreTags", (yaml.SafeLoader,), {})
    loader.add_multi_constructor("!", lambda loader_, suffix, node: None)
    with open(path) as stream:
        data = yaml.load(stream, Loader=loader)
    return data if isinstance(data, dict) else {}


def checkpoint_of(yaml_path: pathlib.Path, checkpoint) -> pathlib.Path | None:
    """The checkpoint that will be loaded: --checkpoint, else the YAML's (resolved as the loader does)."""
    from modules.model import resolve_checkpoint_path

    if checkpoint:
        path = pathlib.Path(checkpoint)
        if not path.exists():
            raise EvaluationError(f"{path}: --checkpoint not found; give a save folder or a CKPT+* folder.")
        return path
    written = _raw_yaml(yaml_path).get("checkpoint")
    return resolve_checkpoint_path(written, yaml_path) if written else None


def vocabulary_rows(checkpoint: pathlib.Path) -> int:
    """Embedding rows of the newest model.ckpt under `checkpoint` (memory-mapped: nothing is loaded)."""
    from modules.checkpoint import EMBEDDING_KEY, MODEL_FILE, find_checkpoints

    try:
        folder = find_checkpoints(checkpoint)[-1]
    except FileNotFoundError as error:
        raise EvaluationError(str(error)) from error
    state = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True, mmap=True)
    if EMBEDDING_KEY not in state:
        raise EvaluationError(f"{folder / MODEL_FILE}: no {EMBEDDING_KEY}; not a DuplexMamba checkpoint.")
    return int(state[EMBEDDING_KEY].shape[0])


def state_tokens_of(checkpoint: pathlib.Path | None, needs_states: bool) -> int:
    """3 for a stage-3/4 checkpoint (or the YAML's random weights), 1 for a stage-1/2 one; an error when a
    stage-1/2 checkpoint is asked for state tokens, replies or conversations."""
    from modules.tokenizer import vocab_rows

    if checkpoint is None:
        return 3
    rows = vocabulary_rows(checkpoint)
    if rows == vocab_rows(3):
        return 3
    if rows == vocab_rows(1) and not needs_states:
        return 1
    if rows == vocab_rows(1):
        raise EvaluationError(f"{checkpoint}: a stage-1/2 checkpoint ({rows} vocabulary rows, no state tokens) "
                              "cannot be evaluated for state tokens, answers or conversations; use --metrics wer, "
                              "or a stage-3/4 checkpoint (50280 rows).")
    raise EvaluationError(f"{checkpoint}: {rows} vocabulary rows; expected 50278 (stages 1-2) or 50280 (3-4).")


def load_model(yaml_path, checkpoint, num_state_tokens, device=None, precision=None):
    """The YAML's network with `checkpoint` (None: the YAML's own) for `num_state_tokens`; (hparams, tokenizer)."""
    from modules.model import load_inference_network
    from modules.tokenizer import load_tokenizer

    overrides = {"net": {"num_state_tokens": num_state_tokens}}
    hparams = load_inference_network(yaml_path, checkpoint=checkpoint, device=device, precision=precision,
                                     overrides=overrides)
    return hparams, load_tokenizer(num_state_tokens=num_state_tokens)


def check_output_folder(out: pathlib.Path, checkpoint: pathlib.Path | None) -> None:
    """Refuse to write into a training folder (or next to the evaluated checkpoint's experiment)."""
    out = out.resolve()
    for folder in (out, *out.parents):
        marker = next((m for m in TRAINING_MARKERS if (folder / m).is_file()), None)
        if marker is None and folder.is_dir() and any(folder.glob("CKPT+*")):
            marker = "CKPT+* folders"
        if marker:
            raise EvaluationError(f"{out}: --out lies inside the training folder {folder} (it holds {marker}); "
                                  "write the report elsewhere, e.g. reports/<name>.")
    if checkpoint is not None:
        checkpoint = checkpoint.resolve()
        save = checkpoint.parent if checkpoint.name.startswith("CKPT+") else checkpoint
        experiment = save.parent
        if experiment != pathlib.Path(experiment.anchor) and (out == experiment or experiment in out.parents):
            raise EvaluationError(f"{out}: --out lies inside {experiment}, the experiment folder of the checkpoint "
                                  "being evaluated; write the report elsewhere, e.g. reports/<name>.")


# ================================================================== scores
def edit_distance(reference: list, hypothesis: list) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, start=1):
        current = [i]
        for j, hyp in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1]


def error_rates(pairs) -> dict:
    """WER and CER (in %) over (reference, hypothesis) pairs of normalised strings."""
    word_errors = sum(edit_distance(r.split(), h.split()) for r, h in pairs)
    words = sum(len(r.split()) for r, _ in pairs)
    char_errors = sum(edit_distance(list(r), list(h)) for r, h in pairs)
    chars = sum(len(r) for r, _ in pairs)
    return {"WER": 100.0 * word_errors / max(words, 1), "CER": 100.0 * char_errors / max(chars, 1),
            "utterances": len(pairs), "words": words, "word_errors": word_errors}


def state_scores(decisions) -> dict:
    """Per class precision / recall / F1, macro-F1, accuracy and the confusion counts, from (expected, predicted)."""
    classes = list(prompts.STATE_TOKENS)
    confusion = {e: {p: 0 for p in classes + [NO_STATE]} for e in classes}
    for expected, predicted in decisions:
        confusion[expected][predicted if predicted in classes else NO_STATE] += 1
    per_class = {}
    for name in classes:
        hits = confusion[name][name]
        predicted = sum(confusion[e][name] for e in classes)
        actual = sum(confusion[name].values())
        precision = hits / predicted if predicted else 0.0
        recall = hits / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[STATE_NAMES[name]] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    present = [v for v in per_class.values() if v["support"]]
    return {"accuracy": sum(e == p for e, p in decisions) / max(len(decisions), 1), "count": len(decisions),
            "macro_f1": sum(v["f1"] for v in present) / max(len(present), 1), "per_class": per_class,
            "confusion": {STATE_NAMES[e]: {STATE_NAMES.get(p, p): n for p, n in row.items()}
                          for e, row in confusion.items()}}


def contains_key(reply: str, key: str) -> bool:
    """Whether the normalised reply contains the normalised key as whole words."""
    key = normalise(key)
    return bool(key) and f" {key} " in f" {normalise(reply)} "


def is_incomplete_reply(reply: str, words: int = 6) -> bool:
    """Whether the reply is one of the paper's appendix B.1 replies (its first `words` words)."""
    start = normalise(reply).split()[:words]
    return bool(start) and any(normalise(r).split()[:len(start)] == start for r in prompts.INCOMPLETE_REPLIES)


def save_confusion_png(confusion: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(confusion)
    cols = list(next(iter(confusion.values())))
    counts = [[confusion[r][c] for c in cols] for r in rows]
    figure, axes = plt.subplots(figsize=(5.5, 4))
    axes.imshow(counts, cmap="Blues")
    axes.set_xticks(range(len(cols)), cols)
    axes.set_yticks(range(len(rows)), rows)
    axes.set_xlabel("predicted")
    axes.set_ylabel("expected")
    axes.set_title(title)
    for i, row in enumerate(counts):
        for j, value in enumerate(row):
            dark = value > max(map(max, counts)) / 2
            axes.text(j, i, str(value), ha="center", va="center", color="white" if dark else "black")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ================================================================== manifest evaluation
def evaluate_utterances(model, utterances, metrics, asr_tasks=("asr",), load=None, progress=True, batch_size=1):
    """Run the model on every utterance a metric needs, `batch_size` at a time; returns (scores, prediction
    records). Greedy decoding makes the results independent of `batch_size` (tested)."""
    load = load or _load_audio
    wer_pairs, decisions, answers, records = [], [], [], []
    needed = [(u, _wants(u, metrics, asr_tasks)) for u in utterances]
    needed = [(u, wants) for u, wants in needed if any(wants)]
    with tqdm(total=len(needed), desc="utterances", unit="utt", disable=not progress) as bar:
        for first in range(0, len(needed), batch_size):
            batch = needed[first:first + batch_size]
            wavs = [load(u.wav) for u, _ in batch]
            for_asr = [wav for wav, (_, (asr, _)) in zip(wavs, batch) if asr]
            for_state = [wav for wav, (_, (_, state)) in zip(wavs, batch) if state]
            transcripts = iter(model.transcribe(for_asr) if for_asr else [])
            responses = iter(model.respond(for_state) if for_state else [])
            for u, (wants_wer, wants_state) in batch:
                record = {"id": u.utt_id, "task": u.task}
                if wants_wer:
                    hypothesis = next(transcripts)
                    wer_pairs.append((u.family, (normalise(u.words), normalise(hypothesis))))
                    record.update(reference=u.words, transcript=hypothesis)
                if wants_state:
                    predicted, reply = next(responses)
                    decisions.append((u.family, (u.state, predicted)))
                    record.update(expected_state=u.state, state=predicted, reply=reply)
                    if "answer" in metrics and u.task == "qa" and u.answer:
                        answers.append(contains_key(reply, u.answer))
                        record.update(answer=u.answer, answer_right=answers[-1])
                records.append(record)
            bar.update(len(batch))
    scores = {}
    if "wer" in metrics:
        scores["asr"] = error_rates([pair for _, pair in wer_pairs])
    if "state" in metrics:
        scores["state"] = state_scores([decision for _, decision in decisions])
    if "answer" in metrics:
        scores["answer"] = {"accuracy": sum(answers) / max(len(answers), 1), "right": sum(answers),
                            "count": len(answers)}
    by_family = scores_by_family(wer_pairs, decisions)
    if by_family:
        scores["by_voice_family"] = by_family
    return scores, records


def scores_by_family(wer_pairs, decisions) -> dict:
    """WER and state accuracy of each voice family, from the (family, pair) and (family, decision) lists (when
    the manifest's speakers are known): which voices a model hears well and which not."""
    families = sorted({family for family, _ in wer_pairs + decisions if family})
    out = {}
    for family in families:
        pairs = [pair for f, pair in wer_pairs if f == family]
        chosen = [decision for f, decision in decisions if f == family]
        out[family] = {"asr": error_rates(pairs) if pairs else None,
                       "state_accuracy": state_scores(chosen)["accuracy"] if chosen else None,
                       "decisions": len(chosen)}
    return out


def _wants(u: Utterance, metrics, asr_tasks) -> tuple[bool, bool]:
    """(a transcript, a state decision) for this utterance under these metrics."""
    wants_wer = "wer" in metrics and u.task in asr_tasks and bool(u.words)
    wants_state = ("state" in metrics or "answer" in metrics) and u.task in STATE_TASKS and bool(u.state)
    return wants_wer, wants_state


def _load_audio(path):
    from src.audio import load_audio
    return load_audio(path)


# ================================================================== conversation scripts
@dataclass
class _Played:
    """One script event and the session events of its slices."""

    kind: str
    raw: dict
    slices: list = field(default_factory=list)  # (ScriptSlice, [Event], seconds the feed took) per slice
    speech_end_s: float | None = None


def script_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The scripts of a folder (or one script file), checked before any audio is decoded."""
    from duplex.script import load_script

    if folder.is_file():
        files = [folder]
    elif folder.is_dir():
        files = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    else:
        raise EvaluationError(f"{folder}: --scripts must be a folder of conversation scripts or one script.")
    if not files:
        raise EvaluationError(f"{folder}: no *.yaml conversation scripts in this folder.")
    for path in files:
        try:
            events = load_script(path)
        except (ValueError, FileNotFoundError) as error:
            raise EvaluationError(str(error)) from error
        _check_audio_exists([e.path for e in events if e.kind == "audio"], path)
    return files


def play_script(path: pathlib.Path, new_session, load=None) -> list[_Played]:
    """Feed one script to a fresh session, event by event; the session's `finish()` ends it."""
    from duplex.script import load_script, script_slices

    load = load or _load_audio
    events = load_script(path)
    raw = yaml.safe_load(path.read_text())
    raw_events = raw["events"] if isinstance(raw, dict) else raw
    session = new_session()
    config = session.config
    played = []
    try:
        for event, entry in zip(events, raw_events):
            item = _Played(event.kind, entry)
            pieces = script_slices([event], config.slice_seconds, config.merge_short_tail, load_audio=load)
            for piece in pieces:
                started = time.perf_counter()
                result = session.feed(piece.wav, label=piece.label)
                item.slices.append((piece, result, time.perf_counter() - started))
            if event.kind != "silence" and item.slices:
                item.speech_end_s = _speech_end(item)
            played.append(item)
        played.append(_Played("final", {}, [(None, session.finish(), 0.0)]))
    finally:
        session.close()
    return played


def _speech_end(item: _Played) -> float:
    """Stream time of the last speech sample of an audio event (its slices may end in silence)."""
    wav = torch.cat([piece.wav for piece, _, _ in item.slices])  # (N,)
    loud = (wav.abs() > 10 ** (SPEECH_DBFS / 20)).nonzero()
    first = item.slices[0][1][0]
    end = (int(loud[-1]) + 1) if len(loud) else wav.numel()
    return first.start_s + end / 16000


def score_script(played: list[_Played]) -> dict:
    """Slice decisions, answers and latencies of one played script."""
    decisions, answers, latencies, compute = [], [], [], []
    for item in played:
        for piece, events, seconds in item.slices:
            if piece is not None and piece.wav is not None:
                compute.append(seconds)
                if piece.expect is not None:
                    decisions.append((piece.expect, events[0].state_token or NO_STATE))
    audio = [i for i, item in enumerate(played) if item.kind not in ("silence", "final")]
    for i, next_audio in zip(audio, audio[1:] + [len(played)]):
        item = played[i]
        key, kind = item.raw.get("answer") or item.raw.get("reply"), item.raw.get("reply_kind")
        if not (key or kind == "incomplete"):
            continue
        reply, emitted_at = _reply_in(played[i:next_audio])  # from this event up to the next audio event
        right = is_incomplete_reply(reply) if kind == "incomplete" else contains_key(reply, key)
        answers.append({"key": key or "appendix B.1 reply", "reply": reply, "right": right})
        if emitted_at is not None:
            latencies.append(emitted_at - item.speech_end_s)
    return {"decisions": decisions, "answers": answers, "latencies": latencies, "compute": compute}


def _reply_in(items: list[_Played]) -> tuple[str, float | None]:
    """Text of the first reply started within `items` (up to the next reply start) and the stream time at
    which its first text was emitted (end of that slice)."""
    from duplex import events as ev

    started, text, emitted_at = False, "", None
    for item in items:
        for _, events, _ in item.slices:
            for event in events:
                if ev.REPLY_START in event.changes:
                    if started:
                        return text, emitted_at
                    started = True
                if started and event.text:
                    text += event.text
                    if emitted_at is None:
                        emitted_at = event.start_s + event.duration_s
    return text, emitted_at


def evaluate_scripts(files, new_session, load=None, progress=True) -> tuple[dict, list]:
    """Play and score every script; totals over all of them, and one record per script."""
    decisions, answers, latencies, compute, records = [], [], [], [], []
    for path in tqdm(files, desc="conversations", unit="script", disable=not progress):
        scores = score_script(play_script(path, new_session, load))
        decisions += scores["decisions"]
        answers += scores["answers"]
        latencies += scores["latencies"]
        compute += scores["compute"]
        records.append({"script": str(path), "slices": [list(d) for d in scores["decisions"]],
                        "answers": scores["answers"], "latencies_s": scores["latencies"]})
    totals = {
        "scripts": len(files),
        "slice_state": state_scores(decisions),
        "answer": {"accuracy": sum(a["right"] for a in answers) / max(len(answers), 1),
                   "right": sum(a["right"] for a in answers), "count": len(answers)},
        "latency_s": _summary(latencies),
        "slice_compute_s": _summary(compute),
    }
    return totals, records


def _summary(values) -> dict:
    values = sorted(values)
    if not values:
        return {"count": 0}
    return {"count": len(values), "mean": sum(values) / len(values), "median": values[len(values) // 2],
            "max": values[-1]}


# ================================================================== report
def write_report(out: pathlib.Path, header: dict, results: dict, records: list) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({**header, "results": results}, indent=1))
    with open(out / "predictions.jsonl", "w") as stream:
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    for name, result in results.items():
        state = result.get("state") or result.get("slice_state")
        if state and state["count"]:
            save_confusion_png(state["confusion"], out / f"confusion-{_slug(name)}.png", name)
    (out / "report.md").write_text(markdown(header, results))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in pathlib.Path(name).stem or name)


def _family_row(family: str, group: dict) -> str:
    asr, accuracy = group["asr"], group["state_accuracy"]
    wer = f"{asr['WER']:.2f} %" if asr else "-"
    state = f"{accuracy:.3f}" if accuracy is not None else "-"
    return f"| {family} | {wer} | {asr['utterances'] if asr else 0} | {state} | {group['decisions']} |"


def markdown(header: dict, results: dict) -> str:
    lines = ["# Evaluation report", "", f"- command: `{header['command']}`", f"- model: `{header['yaml']}`, "
             f"checkpoint `{header['checkpoint']}`", f"- device: {header['device']}, {header['date']}", ""]
    for name, result in results.items():
        lines += [f"## {name}", ""]
        if "asr" in result:
            asr = result["asr"]
            lines += [f"- WER {asr['WER']:.2f} %, CER {asr['CER']:.2f} % ({asr['utterances']} utterances, "
                      f"{asr['words']} words)"]
        state = result.get("state") or result.get("slice_state")
        if state is not None and not state["count"]:  # e.g. real recordings: transcripts, no expected state
            lines += ["- state: none to score (no expected state tokens)"]
        elif state:
            what = "slice state accuracy" if "slice_state" in result else "state accuracy"
            lines += [f"- {what} {state['accuracy']:.3f} ({state['count']}), macro-F1 {state['macro_f1']:.3f}",
                      "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
            lines += [f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
                      for c, v in state["per_class"].items()]
            lines += ["", f"![confusion](confusion-{_slug(name)}.png)", ""]
        if result.get("by_voice_family"):
            lines += ["| voice family | WER | transcripts | state accuracy | decisions |", "|---|---|---|---|---|"]
            lines += [_family_row(family, group) for family, group in result["by_voice_family"].items()] + [""]
        if "answer" in result:
            answer = result["answer"]
            lines += [f"- answers right {answer['right']}/{answer['count']} = {answer['accuracy']:.3f}"
                      if answer["count"] else "- answers: none to score (no answer keys)"]
        if "latency_s" in result and result["latency_s"]["count"]:
            latency, compute = result["latency_s"], result["slice_compute_s"]
            lines += [f"- response latency (end of speech -> first reply text, stream time): mean "
                      f"{latency['mean']:.2f} s, median {latency['median']:.2f} s, max {latency['max']:.2f} s "
                      f"({latency['count']} replies); processing per slice: mean {compute['mean'] * 1000:.1f} ms"]
        lines.append("")
    return "\n".join(lines)


# ================================================================== command line
def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m src.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("yaml", type=pathlib.Path, help="inference YAML, e.g. duplex/duplex_demo.yaml")
    parser.add_argument("--checkpoint", help="save folder (CKPT+* averaged) or one CKPT folder; default: YAML")
    parser.add_argument("--manifest", type=pathlib.Path, action="append", default=[],
                        help="manifest CSV to evaluate (repeat for several)")
    parser.add_argument("--wavs", nargs="+", default=[], help="audio files named question_*, ignore_*, ...")
    parser.add_argument("--scripts", type=pathlib.Path, action="append", default=[],
                        help="folder of conversation scripts, or one script (repeat for several)")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="report folder (not a training folder)")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS),
                        help="manifest metrics (default: all); a stage-1/2 checkpoint allows only wer")
    parser.add_argument("--asr-tasks", nargs="+", default=["asr"],
                        help="manifest tasks whose rows are transcribed for WER (default: asr)")
    parser.add_argument("--asr-instruction", default=prompts.ASR_SENTENCES[0],
                        help="instruction of the ASR prompt (stage 1 was trained on prompts.STAGE1_SENTENCES)")
    parser.add_argument("--max-rows", type=_positive_int, metavar="N",
                        help="evaluate at most N rows of each manifest, evenly spaced over it (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=_positive_int, default=16, metavar="N",
                        help="utterances decoded together (default 16; greedy results do not depend on it)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N; default: the YAML's")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="default: the YAML's")
    parser.add_argument("--listener-context", choices=("conversation", "none"),
                        help="scripts: override the YAML's duplex.listener_context")
    parser.add_argument("--greedy-states", action="store_true", help="scripts: argmax state tokens")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not (args.manifest or args.wavs or args.scripts):
        parser.error("give at least one of --manifest, --wavs, --scripts")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args, argv)
    except (EvaluationError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run(args, argv=None) -> int:
    """Check every input first, then load the model once and evaluate each source."""
    needs_states = bool(args.wavs or args.scripts) or bool(set(args.metrics) - {"wer"})
    checkpoint = checkpoint_of(args.yaml, args.checkpoint)
    num_state_tokens = state_tokens_of(checkpoint, needs_states)
    check_output_folder(args.out, checkpoint)
    manifests = {str(path): read_manifest(path, args.metrics, args.max_rows) for path in args.manifest}
    wavs = wav_utterances(args.wavs) if args.wavs else []
    scripts = {str(folder): script_files(folder) for folder in args.scripts}
    hparams, tokenizer = load_model(args.yaml, args.checkpoint, num_state_tokens, args.device, args.precision)
    model = GreedyModel(hparams["net"], tokenizer, num_state_tokens, args.max_new_tokens, args.asr_instruction,
                        batch_size=args.batch_size)
    results, records = {}, []
    for name, utterances in manifests.items():
        results[name], found = evaluate_utterances(model, utterances, args.metrics, tuple(args.asr_tasks),
                                                   progress=not args.no_progress, batch_size=args.batch_size)
        records += [{"source": name, **r} for r in found]
    if wavs:
        results["--wavs"], found = evaluate_utterances(model, wavs, ["state"], progress=not args.no_progress,
                                                       batch_size=args.batch_size)
        records += [{"source": "--wavs", **r} for r in found]
    if scripts:
        new_session = session_factory(hparams, tokenizer, model, args)
        for name, files in scripts.items():
            results[name], found = evaluate_scripts(files, new_session, progress=not args.no_progress)
            records += [{"source": name, **r} for r in found]
    header = {"command": "python -m src.evaluate " + " ".join(sys.argv[1:] if argv is None else argv),
              "yaml": str(args.yaml), "checkpoint": str(checkpoint), "device": str(model.runtime.device),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_report(args.out, header, results, records)
    print(markdown(header, results))
    print(f"report written to {args.out}/report.md")
    return 0


def session_factory(hparams, tokenizer, model: GreedyModel, args):
    """New duplex sessions on the evaluated network (its runtime is shared), with the YAML's duplex block."""
    from duplex.engine import duplex_config_from, make_encoder
    from duplex.sampling import SamplingConfig
    from duplex.session import DuplexSession

    config = duplex_config_from(hparams, str(args.yaml))
    if args.listener_context:
        config = dataclasses.replace(config, listener_context=args.listener_context)
    if args.greedy_states:
        config = dataclasses.replace(config, state_sampling=SamplingConfig(greedy=True))
    encode = make_encoder(hparams["net"]["speech_encoder"], model.runtime, config)
    return lambda: DuplexSession(model.runtime, encode, tokenizer, config)


if __name__ == "__main__":
    sys.exit(main())
