"""ASR pre-training (paper §3.1): a ConMamba encoder with a Mamba decoder, trained with CTC + attention loss.

DuplexMamba's stage 1 starts from the encoder of such a model (Jiang et al., xi-j/Mamba-ASR `conmambamamba`).
This recipe trains one on any LibriSpeech-format corpus (or our synthetic one) and saves it in exactly the layout
stage 1's `asr_checkpoint_folder` reads: SpeechBrain `CKPT+*` folders with `model.ckpt` (keys `0.*` CNN, `1.*`
ConMamba + decoder, `2.*` sequence head, `3.*` CTC head; modules/asr_decoder.py) and `normalizer.ckpt`.
Every kept checkpoint is averaged by stage 1, so `keep_checkpoints` decides what stage 1 starts from.

Tokens are characters (`CharTokens`), not the LM's GPT-NeoX BPE: only the encoder leaves this recipe, so its
output vocabulary is private. Characters need no training step and no extra file in the save folder, map every
lower-case transcript exactly, keep both heads tiny (a 50k-way BPE head would be 2 x 25.7 M parameters at full size,
a third of the encoder), and suit CTC at the encoder's 40 ms frame rate (speech runs at about 12-18 characters per
second, under the 25 frames per second CTC needs at most). The reference used a 5000-piece unigram model.

Loss, as the reference: ``ctc_weight * CTC + (1 - ctc_weight) * label-smoothed CE`` of the decoder, both summed
over tokens and divided by the batch size ("batchmean").
"""
import logging
import pathlib

import speechbrain as sb
import torch
import torch.nn.functional as F
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.utils.metric_stats import ErrorRateStats
from torch import nn

from modules.speech import cnn_frames, fbank_frames
from src.audio import MIN_SECONDS, load_audio
from src.brain import TrainingBrain
from src.handoff import average_into
from src.manifest_check import read_rows
from src.stages import fit_and_test, parse_run_arguments, prepare_data, start_experiment

logger = logging.getLogger(__name__)

ASR_COLUMNS = ("ID", "duration", "wav", "wrd")


class CharTokens:
    """Character vocabulary of the ASR heads: 0 blank (CTC) = padding, 1 bos, 2 eos, 3 unknown, then characters.

    Text is lower-cased and its whitespace collapsed; a character outside the set becomes `UNK` (the manifests are
    scanned for such characters at start-up, so a corpus in another alphabet shows up in the log).

    Example
    -------
    >>> tokens = CharTokens()
    >>> tokens.decode(tokens.encode("It's  42!"))
    "it's 42"
    """

    BLANK = PAD = 0
    BOS, EOS, UNK = 1, 2, 3
    SPECIALS = ("<blank>", "<bos>", "<eos>", "<unk>")
    SYMBOLS = " '" + "abcdefghijklmnopqrstuvwxyz" + "0123456789"

    def __init__(self):
        self.ids = {char: index for index, char in enumerate(self.SYMBOLS, start=len(self.SPECIALS))}
        self.chars = {index: char for char, index in self.ids.items()}

    def __len__(self):
        return len(self.SPECIALS) + len(self.SYMBOLS)

    def normalize(self, text):
        return " ".join(text.lower().split())

    def encode(self, text):
        return [self.ids.get(char, self.UNK) for char in self.normalize(text)]

    def unknown_characters(self, text):
        return set(self.normalize(text)) - set(self.ids)

    def decode(self, ids):
        return "".join(self.chars.get(int(i), "") for i in ids)

    def ctc_collapse(self, frame_ids):
        """Greedy CTC: merge repeats, drop blanks."""
        out, previous = [], None
        for i in frame_ids:
            i = int(i)
            if i != previous and i != self.BLANK:
                out.append(i)
            previous = i
        return out


# ---- data ---------------------------------------------------------------------------------------------------------
def read_asr_manifest(csv_path):
    """CSV (columns ID, duration, wav, wrd; docs/corpus.md) -> DynamicItemDataset of rows with a transcript.

    Raises before any training for a missing file or column, a bad duration or missing audio; rows without a
    transcript (`wrd` empty) and clips shorter than one adapter position are skipped with a log line.
    """
    csv_path = pathlib.Path(csv_path)
    rows = [row for _, row in read_rows(csv_path, ASR_COLUMNS)]
    data, untranscribed, too_short = {}, 0, 0
    for row in rows:
        entry = _asr_entry(row, csv_path)
        untranscribed += not entry["wrd"]
        too_short += entry["duration"] < MIN_SECONDS
        if entry["wrd"] and entry["duration"] >= MIN_SECONDS:
            data[row["ID"]] = entry
    absent = [entry["wav"] for entry in data.values() if not pathlib.Path(entry["wav"]).is_file()]
    if absent:
        raise FileNotFoundError(f"{csv_path}: {len(absent)} audio file(s) not found, e.g. {absent[:3]}; relative "
                                "`wav` paths are read from the CSV's folder. Re-run data preparation or fix the paths.")
    if untranscribed or too_short:
        logger.info("%s: skipped %d row(s) without a transcript and %d shorter than %.1f s", csv_path,
                    untranscribed, too_short, MIN_SECONDS)
    if not data:
        raise ValueError(f"{csv_path}: no row with a transcript (`wrd`) and at least {MIN_SECONDS} s of audio.")
    return DynamicItemDataset(data)


def _asr_entry(row, csv_path):
    try:
        duration = float(row["duration"])
    except (TypeError, ValueError):
        raise ValueError(f"{csv_path}: row {row['ID']} has duration {row['duration']!r}; expected seconds as a "
                         "number (re-run data preparation).") from None
    return {"duration": duration, "wav": str((csv_path.parent / row["wav"]).resolve()),
            "wrd": (row["wrd"] or "").strip()}


def add_asr_pipelines(dataset, tokens):
    """sig (N,) 16 kHz; tokens (CTC target), tokens_bos (decoder input), tokens_eos (decoder target), n_tokens."""

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return load_audio(wav)  # (N,)

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("tokens", "tokens_bos", "tokens_eos", "n_tokens")
    def text_pipeline(wrd):
        ids = tokens.encode(wrd)
        yield torch.tensor(ids, dtype=torch.long)
        yield torch.tensor([tokens.BOS] + ids, dtype=torch.long)
        yield torch.tensor(ids + [tokens.EOS], dtype=torch.long)
        yield len(ids)

    sb.dataio.dataset.add_dynamic_item([dataset], audio_pipeline)
    sb.dataio.dataset.add_dynamic_item([dataset], text_pipeline)
    sb.dataio.dataset.set_output_keys([dataset], ["id", "wrd", "sig", "tokens", "tokens_bos", "tokens_eos",
                                                   "n_tokens"])
    return dataset


def make_asr_datasets(hparams):
    """train / valid / {test name: dataset}; every manifest is checked before the model is built."""
    def load(path):
        dataset = read_asr_manifest(path)
        report_unknown_characters(dataset, hparams["tokens"], path)
        return add_asr_pipelines(dataset, hparams["tokens"])

    tests = {pathlib.Path(path).stem: load(path) for path in hparams["test_csvs"]}
    return load(hparams["train_csv"]), load(hparams["valid_csv"]), tests


def report_unknown_characters(dataset, tokens, path):
    """Log the transcript characters the ASR heads cannot spell (they train as `<unk>`)."""
    unknown = {}
    for entry in dataset.data.values():
        for char in tokens.unknown_characters(entry["wrd"]):
            unknown[char] = unknown.get(char, 0) + 1
    if unknown:
        common = sorted(unknown, key=unknown.get, reverse=True)[:10]
        logger.warning("%s: %d transcript(s) hold characters outside the ASR set, trained as <unk>: %s", path,
                       max(unknown.values()), ", ".join(repr(char) for char in common))
    return unknown


# ---- network ------------------------------------------------------------------------------------------------------
class ASRForward(nn.Module):
    """wav batch + decoder inputs -> CTC log-probs, encoder lengths, decoder logits (one module for DDP)."""

    def __init__(self, compute_features, normalizer, model):
        super().__init__()
        self.compute_features = compute_features
        self.normalizer = normalizer
        self.model = model

    def encode(self, wavs, wav_lens, epoch=None, augment=None):
        """(B, N) wavs, (B,) relative lengths -> encoder frames (B, T, D), valid frames (B,)."""
        num_samples = torch.round(wav_lens.float() * wavs.shape[1]).long()  # (B,)
        lengths = cnn_frames(fbank_frames(num_samples))  # (B,)
        feats = self.normalizer(self.compute_features(wavs), wav_lens, epoch=epoch)  # (B, T, 80)
        if augment is not None:
            feats, _ = augment(feats, wav_lens)  # SpecAugment-style: same shape
        memory = self.model.asr.encode(self.model.cnn(feats), lengths=lengths)  # (B, T', D)
        return memory, lengths

    def forward(self, wavs, wav_lens, tokens_bos, epoch=None, augment=None):
        memory, lengths = self.encode(wavs, wav_lens, epoch, augment)
        ctc_log_probs = F.log_softmax(self.model.ctc_lin(memory), dim=-1)  # (B, T', V)
        states = self.model.asr.decode(tokens_bos, memory, lengths)  # (B, L, D)
        return ctc_log_probs, lengths, self.model.seq_lin(states)  # ..., (B, L, V)


def asr_loss(ctc_log_probs, lengths, logits, batch, ctc_weight, label_smoothing):
    """ctc_weight * CTC + (1 - ctc_weight) * smoothed CE; each summed over tokens and divided by the batch size."""
    tokens, _ = batch.tokens  # (B, S)
    n_tokens = batch.n_tokens.to(tokens.device)  # (B,)
    ctc = F.ctc_loss(ctc_log_probs.transpose(0, 1).float(), tokens, lengths, n_tokens, blank=CharTokens.BLANK,
                     reduction="sum", zero_infinity=True)
    targets, _ = batch.tokens_eos  # (B, L)
    valid = torch.arange(targets.shape[1], device=targets.device) <= n_tokens.unsqueeze(1)  # ids + eos
    targets = targets.masked_fill(~valid, -100)
    attention = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                label_smoothing=label_smoothing, reduction="sum")
    batch_size = tokens.shape[0]
    return (ctc_weight * ctc + (1 - ctc_weight) * attention) / batch_size, targets


@torch.no_grad()
def greedy_attention_decode(model, memory, lengths, max_tokens):
    """Batched greedy decoding with the Mamba decoder (the prefix is re-run each step: simple, test-time only)."""
    batch = memory.shape[0]
    ids = torch.full((batch, 1), CharTokens.BOS, dtype=torch.long, device=memory.device)  # (B, 1)
    done = torch.zeros(batch, dtype=torch.bool, device=memory.device)
    for _ in range(max_tokens):
        step = model.seq_lin(model.asr.decode(ids, memory, lengths)[:, -1]).argmax(-1)  # (B,)
        step = step.masked_fill(done, CharTokens.EOS)
        ids = torch.cat([ids, step.unsqueeze(1)], dim=1)
        done |= step == CharTokens.EOS
        if done.all():
            break
    hypotheses = []
    for row in ids[:, 1:].tolist():
        hypotheses.append(row[:row.index(CharTokens.EOS)] if CharTokens.EOS in row else row)
    return hypotheses


# ---- Brain --------------------------------------------------------------------------------------------------------
class ASRBrain(TrainingBrain):
    """Train / validate / test the ASR pre-training.

    YAML keys read: `model`, `tokens`, `ctc_weight`, `label_smoothing`, `speed_perturb`, `gain_perturb`, `fea_augment`,
    `noam_annealing`, `keep_checkpoints`, `selection_key`/`selection_mode`, `test_average`, `test_max_tokens`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = 0
        self.train_losses = []

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig  # (B, N), (B,)
        augment = None
        if stage == sb.Stage.TRAIN:
            if self.hparams.speed_perturb is not None:
                wavs = self.hparams.speed_perturb(wavs)  # (B, N')
            if self.hparams.gain_perturb is not None:
                wavs = self.hparams.gain_perturb(wavs)  # (B, N'), each row at its own level
            augment = self.hparams.fea_augment
        tokens_bos, _ = batch.tokens_bos  # (B, L)
        return self.modules.asr(wavs, wav_lens, tokens_bos, epoch=self.epoch, augment=augment)

    def compute_objectives(self, predictions, batch, stage):
        ctc_log_probs, lengths, logits = predictions
        loss, targets = asr_loss(ctc_log_probs, lengths, logits, batch, self.hparams.ctc_weight,
                                 self.hparams.label_smoothing)
        if stage != sb.Stage.TRAIN:
            self._score(ctc_log_probs, lengths, logits, targets, batch, stage)
        return loss

    def _score(self, ctc_log_probs, lengths, logits, targets, batch, stage):
        tokens = self.hparams.tokens
        valid = targets != -100
        self.correct += int(((logits.argmax(-1) == targets) & valid).sum())
        self.total += int(valid.sum())
        references = [tokens.decode(tokens.encode(text)).split() for text in batch.wrd]  # as the heads spell it
        frame_ids = ctc_log_probs.argmax(-1)  # (B, T')
        ctc_text = [tokens.decode(tokens.ctc_collapse(frame_ids[b, : int(lengths[b])])) for b in range(len(batch.id))]
        self.ctc_wer.append(batch.id, [text.split() for text in ctc_text], references)
        if stage == sb.Stage.TEST and self.hparams.test_max_tokens > 0:
            model = self.hparams.model
            memory, memory_lengths = self._unwrapped().encode(*batch.sig)
            hypotheses = greedy_attention_decode(model, memory, memory_lengths, self.hparams.test_max_tokens)
            self.att_wer.append(batch.id, [tokens.decode(ids).split() for ids in hypotheses], references)

    def _unwrapped(self):
        asr = self.modules.asr
        return asr.module if hasattr(asr, "module") else asr

    def on_stage_start(self, stage, epoch=None):
        if epoch is not None:
            self.epoch = epoch
        if stage != sb.Stage.TRAIN:
            self.correct, self.total = 0, 0
            self.ctc_wer, self.att_wer = ErrorRateStats(), ErrorRateStats()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        stats["ACC"] = self.correct / max(self.total, 1)
        stats["WER_ctc"] = self.ctc_wer.summarize("error_rate")
        if self.att_wer.scores:
            stats["WER"] = self.att_wer.summarize("error_rate")
        self.last_stage_stats = stats
        if stage == sb.Stage.VALID:
            self.log_and_save_epoch(stats, epoch, **self.selection_keys())
            self.delete_intra_epoch_checkpoints()  # a stale intra-epoch save would be averaged by stage 1
        else:
            self.hparams.train_logger.log_stats(stats_meta={"Epoch loaded": self.hparams.epoch_counter.current},
                                                test_stats=stats)

    def on_evaluate_start(self, max_key=None, min_key=None):
        """Test the average of the `test_average` best kept checkpoints (what stage 1 will start from when
        test_average equals keep_checkpoints)."""
        average_into(self.checkpointer, self.hparams.model, self.hparams.normalizer, self.hparams.test_average,
                     self.hparams.selection_key, self.hparams.selection_mode)


def run_asr_pretraining(argv, usage=None):
    """Arguments -> YAML -> DDP group -> experiment folder -> manifests (checked) -> fit -> test; returns the Brain."""
    hparams_file, run_opts, overrides = parse_run_arguments(argv, usage)
    hparams = start_experiment(hparams_file, run_opts, overrides)
    prepare_data(hparams)
    train, valid, tests = make_asr_datasets(hparams)
    brain = ASRBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                     run_opts=run_opts, checkpointer=hparams["checkpointer"])
    return fit_and_test(brain, hparams, train, valid, tests)
