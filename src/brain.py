"""The one SpeechBrain `Brain` of all four training stages.

Everything that differs between stages is declared in the stage YAML and read here as plain keys (spec §3):

* `stage` (1-4): prompt family and sequence layout (src/prompts.py, src/stages.py);
* `trained_modules` / `frozen_modules`: names among cnn, encoder, adapter, lm, normalizer; frozen parts get no
  gradient and run in eval mode (no dropout, the normaliser's statistics stay as the previous stage left them);
* `loss_mode` (`paper` | `reference`) and `label_smoothing` (src/objectives.py);
* `selection_key` / `selection_mode` and `test_average`: which checkpoints a test run averages;
* `init_from`: the previous stage's save folder, how many of its checkpoints to average, strictness and vocabulary
  growth (src/handoff.py). It is applied only when this stage has no checkpoint of its own, so resuming never
  re-loads the previous stage over resumed weights (the reference did, spec §8.10);
* `streaming_segment_seconds`: stage 4's streaming alignment (segments encoded independently, one adapter pass);
* `slice_split` of `DuplexForward`: a share of the utterances heard as two engine slices (training only).
* `alignment_ctc` ({weight, scale}; not in the paper): an added CTC of the transcript on the adapter output
  (src/objectives.alignment_ctc_loss), training only;
* `tasks` and `transcripts_as_targets`: which manifest rows a stage reads, and whether each is read as an ASR
  row (its transcript the target; src/stages.as_transcription).
* `lr_scales` ({part: factor}; not in the paper, every factor 1 in our YAMLs): a trained part learns at that
  multiple of the schedule's rate (`scaled_param_groups`), e.g. `lm: 0.1` to let a small pre-trained LM adapt
  slowly.

The forward pass lives in `DuplexForward`, one `nn.Module`, so that DDP wraps exactly what receives gradients.
"""
import logging
import pathlib
import signal

import speechbrain as sb
import torch
from speechbrain.core import INTRA_EPOCH_CKPT_FLAG
from speechbrain.dataio.sampler import DistributedSamplerWrapper
from speechbrain.utils.metric_stats import ErrorRateStats
from torch import nn

from duplex.runtime import TorchMambaRuntime

from src.handoff import average_into, load_previous_stage
from src.data_prep import TASK_ASR
from src.epochs import TimedEpochCounter
from src.metrics import TeacherForcedStats, greedy_decode
from src.objectives import alignment_ctc_loss, compute_loss
from src.run_control import GracefulStop, RandomStates, TrainingStopped
from src.sequence import build_sequences, flatten_context
from src.stages import PromptDraws, TextIds

logger = logging.getLogger(__name__)

PART_NAMES = ("cnn", "encoder", "adapter", "lm", "normalizer")
SAMPLE_RATE = 16000


class DuplexForward(nn.Module):
    """wav batch + token ids -> (logits (B, L, V), SequenceBatch): speech encoder, splice, LM.

    `segment_seconds` switches on stage 4's streaming alignment (spec §3 "Stage 4 streaming"): each utterance is
    cut into segments of about that length, every segment runs through Fbank -> normaliser -> CNN -> ConMamba on
    its own, the encoder frames are concatenated and the adapter runs once over them.

    `slice_split` (training only; not in the paper) hears a share of the utterances as the duplex engine hears a
    question that straddles two of its slices: cut at a random point, each piece through the whole speech encoder
    on its own (features to adapter, as the engine encodes each slice), the two encodings joined. The row's
    labels stay: the whole question, in two pieces, still ends the user's turn. Why: the engine cuts a live
    stream every 2-3 s wherever the user happens to be, so its second probe of a question hears two independent
    encodings; a model that only ever trained on whole clips has never seen that (the conversation scripts'
    split questions). `{share: 0.25, cut: [0.3, 0.7]}`: a quarter of the utterances, cut at 30-70 % of their length.

    `slice_padding` (training only; not in the paper) hears a share of the utterances shorter than one engine
    slice as the engine hears them: inside a whole slice, with silence before and after (`SlicePadding`). Why:
    the engine always encodes whole slices, so a cut-off question that the user stops after arrives as speech
    then silence. Trained only on clips that end where the speech ends, the speedrun's model took "the audio
    stops abruptly" for `<|incomplete|>` and "silence follows" for `<|endofuser|>`: on 2026-12-05 it got 0.97
    recall of incomplete rows in the test manifest and 0 in the conversation scripts, whose slices are padded.
    """

    def __init__(self, speech_encoder, lm, segment_seconds=None, slice_split=None, slice_padding=None):
        super().__init__()
        self.speech_encoder = speech_encoder
        self.lm = lm
        self.segment_seconds = segment_seconds
        self.slice_split = SliceSplit(**slice_split) if isinstance(slice_split, dict) else slice_split
        self.slice_padding = SlicePadding(**slice_padding) if isinstance(slice_padding, dict) else slice_padding

    def forward(self, wavs, wav_lens, texts, epoch=None, context_wavs=None, context_wav_lens=None):
        """wavs (B, N), wav_lens (B,) relative; `texts` = dict of per-sample id lists (see build_sequences);
        context_wavs (C, N') and context_wav_lens (C,): the audio of the earlier turns of multi-turn samples."""
        speech, speech_lens = self.encode_speech(wavs, wav_lens, epoch)  # (B, P, H), (B,)
        if context_wavs is not None:
            context_speech, context_lens = self.encode_speech(context_wavs, context_wav_lens, epoch)  # (C, Q, H)
            texts = {**texts, "context_speech": context_speech, "context_speech_lens": context_lens}
        sequence = build_sequences(self.lm.embed, speech=speech, speech_lens=speech_lens, **texts)
        logits = self.lm(sequence.inputs_embeds)  # (B, L, V)
        return logits, sequence

    def encode_speech(self, wavs, wav_lens, epoch=None):
        if self.training and self.slice_padding is not None and self.slice_padding.share > 0:
            wavs, wav_lens = self.slice_padding.pad(wavs, wav_lens)  # (B, N'), (B,)
        if self.training and self.slice_split is not None and self.slice_split.share > 0:
            return self.encode_with_slice_splits(wavs, wav_lens, epoch)
        return self.encode_whole(wavs, wav_lens, epoch)

    def encode_whole(self, wavs, wav_lens, epoch=None):
        """Each utterance in one piece (or stage 4's streaming segments): (B, P, H), (B,)."""
        if self.segment_seconds is None:
            return self.speech_encoder(wavs, wav_lens, epoch=epoch)  # (B, P, H), (B,)
        return self.encode_streaming(wavs, wav_lens, epoch)

    def encode_with_slice_splits(self, wavs, wav_lens, epoch=None):
        """`slice_split`: the drawn rows as two independently encoded pieces, the others as `encode_whole`."""
        num_samples = torch.round(wav_lens.float() * wavs.shape[1]).long().tolist()
        cuts = self.slice_split.draw(num_samples)  # per row: a sample index, or None (heard whole)
        split_rows = [b for b, cut in enumerate(cuts) if cut is not None]
        if not split_rows:
            return self.encode_whole(wavs, wav_lens, epoch)
        whole_rows = [b for b, cut in enumerate(cuts) if cut is None]
        embeds = [None] * len(num_samples)
        if whole_rows:
            encoded, lengths = self.encode_whole(*_sub_batch([wavs[b, :num_samples[b]] for b in whole_rows]), epoch)
            for row, embed, length in zip(whole_rows, encoded, lengths.tolist()):
                embeds[row] = embed[:length]  # (P, H)
        pieces = [_sub_batch([wavs[b, :cuts[b]] for b in split_rows]),
                  _sub_batch([wavs[b, cuts[b]:num_samples[b]] for b in split_rows])]
        (first, first_lens), (second, second_lens) = (self.speech_encoder(*piece, epoch=epoch) for piece in pieces)
        for i, row in enumerate(split_rows):
            embeds[row] = torch.cat([first[i, :first_lens[i]], second[i, :second_lens[i]]])  # (P1 + P2, H)
        lengths = torch.tensor([e.shape[0] for e in embeds], dtype=torch.long, device=wavs.device)
        return nn.utils.rnn.pad_sequence(embeds, batch_first=True), lengths  # (B, P_max, H), (B,)

    def encode_streaming(self, wavs, wav_lens, epoch=None):
        """Per utterance: independent segment encodings, concatenated, one adapter pass; then right-padded.

        Every segment of the batch goes through one encoder pass (`SpeechEncoder.encode_pieces`), exact against
        encoding each segment alone (tests/test_training_streaming.py)."""
        adapter = self.speech_encoder.adapter
        num_samples = torch.round(wav_lens.float() * wavs.shape[1]).long().tolist()
        segments = [streaming_segments(wavs[b, :n], self.segment_seconds) for b, n in enumerate(num_samples)]
        frames = self.speech_encoder.encode_pieces([piece for row in segments for piece in row], epoch)
        joined, start = [], 0
        for row in segments:
            joined.append(torch.cat(frames[start:start + len(row)]))  # (T'_row, D): the row's segments in order
            start += len(row)
        frame_lengths = torch.tensor([j.shape[0] for j in joined], dtype=torch.long, device=wavs.device)  # (B,)
        lengths = adapter.output_lengths(frame_lengths)  # (B,)
        embeds = adapter(nn.utils.rnn.pad_sequence(joined, batch_first=True))  # (B, P_max, H)
        valid = torch.arange(embeds.shape[1], device=wavs.device) < lengths.view(-1, 1)  # (B, P_max)
        return embeds * valid.unsqueeze(-1).to(embeds.dtype), lengths  # padding positions are zero


def _sub_batch(wavs: list) -> tuple:
    """1-D waveforms -> (B, N_max) zero-padded and their relative lengths (B,), as the data loader gives them."""
    longest = max(w.shape[0] for w in wavs)
    batch = nn.utils.rnn.pad_sequence(wavs, batch_first=True)  # (B, N_max)
    return batch, torch.tensor([w.shape[0] / longest for w in wavs], device=batch.device)


class SliceSplit:
    """Which utterances `DuplexForward` hears in two pieces, and where it cuts them (see its docstring).

    Draws from torch's global generator, so a resumed run (whose random states are restored) cuts the same way.
    Utterances shorter than 2 x `min_seconds` are always heard whole: a piece must hold some speech."""

    def __init__(self, share: float, cut=(0.3, 0.7), min_seconds: float = 0.5, sample_rate: int = SAMPLE_RATE):
        low, high = (float(x) for x in cut)
        if not 0.0 <= float(share) <= 1.0 or not 0.0 < low <= high < 1.0:
            raise ValueError(f"slice_split: share must be in [0, 1] and cut a range inside (0, 1); got share {share}, "
                             f"cut {list(cut)}")
        self.share, self.low, self.high = float(share), low, high
        self.min_samples = int(min_seconds * sample_rate)

    def draw(self, num_samples: list[int]) -> list[int | None]:
        """Per utterance of `num_samples` samples: the cut's sample index, or None to hear it whole."""
        picks = torch.rand(len(num_samples)).tolist()
        where = torch.rand(len(num_samples)).tolist()
        cuts = []
        for n, pick, at in zip(num_samples, picks, where):
            cut = int(n * (self.low + (self.high - self.low) * at))
            usable = pick < self.share and min(cut, n - cut) >= self.min_samples
            cuts.append(cut if usable else None)
        return cuts


class SlicePadding:
    """Which utterances `DuplexForward` hears inside a whole engine slice, and with how much silence around them.

    A drawn utterance of n < `slice_seconds` samples gets silence to a total length drawn uniformly between n and
    the slice, a random part of it before the speech and the rest after, as the engine's fixed slices place
    speech anywhere in them. The silence is a noise floor drawn between -90 dBFS (digital silence, as the
    scripts' padding) and `floor_dbfs` (a quiet microphone). Draws from torch's global generator, so a resumed
    run pads alike. Utterances as long as a slice are left alone."""

    def __init__(self, share: float, slice_seconds: float = 3.0, floor_dbfs: float = -50.0,
                 sample_rate: int = SAMPLE_RATE):
        if not 0.0 <= float(share) <= 1.0 or float(slice_seconds) <= 0 or not -90.0 <= float(floor_dbfs) <= 0.0:
            raise ValueError(f"slice_padding: share must be in [0, 1], slice_seconds positive and floor_dbfs in "
                             f"[-90, 0]; got share {share}, slice_seconds {slice_seconds}, floor_dbfs {floor_dbfs}")
        self.share, self.floor_dbfs = float(share), float(floor_dbfs)
        self.slice_samples = int(float(slice_seconds) * sample_rate)

    def draw(self, num_samples: list[int]) -> list[tuple[int, int, float] | None]:
        """Per utterance: (samples of silence before, after, noise level as amplitude), or None to leave it."""
        picks, totals, leads, levels = (torch.rand(len(num_samples)).tolist() for _ in range(4))
        plans = []
        for n, pick, total, lead, level in zip(num_samples, picks, totals, leads, levels):
            if pick >= self.share or n >= self.slice_samples:
                plans.append(None)
                continue
            silence = int((self.slice_samples - n) * total)
            before = int(silence * lead)
            dbfs = -90.0 + (self.floor_dbfs + 90.0) * level
            plans.append((before, silence - before, 10 ** (dbfs / 20)))
        return plans

    def pad(self, wavs, wav_lens):
        """(B, N) padded batch, (B,) relative lengths -> the same with the drawn rows inside their silence."""
        num_samples = torch.round(wav_lens.float() * wavs.shape[1]).long().tolist()
        plans = self.draw(num_samples)
        if all(plan is None for plan in plans):
            return wavs, wav_lens
        rows = []
        for b, (n, plan) in enumerate(zip(num_samples, plans)):
            speech = wavs[b, :n]  # (n,)
            if plan is not None:
                before, after, level = plan
                noise = torch.randn(before + after, device=wavs.device, dtype=wavs.dtype) * level  # (S,)
                speech = torch.cat([noise[:before], speech, noise[before:]])  # (before + n + after,)
            rows.append(speech)
        return _sub_batch(rows)


def streaming_segments(wav, segment_seconds, sample_rate=SAMPLE_RATE):
    """Spec §3: up to one segment length -> one piece; otherwise floor(duration / len) pieces of
    int(N * len / duration) samples, the last absorbing the remainder (so it is len..2*len long)."""
    n = wav.shape[0]
    duration = n / sample_rate
    if duration <= segment_seconds:
        return [wav]
    count = int(duration // segment_seconds)
    size = int(n * segment_seconds / duration)
    return [wav[i * size:(i + 1) * size] if i < count - 1 else wav[i * size:] for i in range(count)]


class ShardedSampler(DistributedSamplerWrapper):
    """This rank's share of another sampler's items (batches, for a batch sampler), always as a sequence.

    SpeechBrain's wrapper returns `itemgetter(*picked)(items)`, which for a rank picking exactly one item is that
    item itself: a rank given one batch then iterates the batch's sample indices as if they were batches
    ("'int' object is not iterable" under torchrun with dynamic batching and few batches per rank).
    """

    def __iter__(self):
        items = list(self.sampler.__iter__())
        picked = super(DistributedSamplerWrapper, self).__iter__()  # DistributedSampler's indices into `items`
        return iter([items[i] for i in picked])



class TrainingBrain(sb.Brain):
    """The training hooks every brain here shares (stages, ASR and LM pre-training): DDP sharding with
    `ShardedSampler`, the Noam rate set before the step it applies to, each training loss kept in
    ``self.train_losses`` (a subclass creates that list), and the end of an epoch: its log line, its checkpoint,
    the stale intra-epoch checkpoint deleted."""

    def _train_loader_specifics(self, dataset, loader_kwargs):
        """SpeechBrain's DDP sharding of the training (batch) sampler, with its wrapper replaced by
        `ShardedSampler`, which also becomes ``self.train_sampler`` (set_epoch each epoch)."""
        loader_kwargs = super()._train_loader_specifics(dataset, loader_kwargs)
        for key in ("batch_sampler", "sampler"):
            wrapper = loader_kwargs.get(key)
            if type(wrapper) is DistributedSamplerWrapper:
                loader_kwargs[key] = self.train_sampler = ShardedSampler(
                    wrapper.sampler, rank=self.rank, shuffle=wrapper.shuffle, drop_last=wrapper.drop_last)
        return loader_kwargs

    @property
    def _optimizer_step_limit_exceeded(self):
        """SpeechBrain ends the epoch's batch loop, and after its validation the whole fit, when this is True.

        It is also True once a `TimedEpochCounter`'s budget is spent, so that an epoch longer than the time left
        ends early and normally (validation, checkpoint, test) instead of being killed at the step's deadline.
        Under DDP every process must take the same decision, so the clocks are agreed on by all-reduce.
        """
        if super()._optimizer_step_limit_exceeded:
            return True
        counter = getattr(self.hparams, "epoch_counter", None)
        if not isinstance(counter, TimedEpochCounter) or counter.max_minutes is None:
            return False
        spent = counter.out_of_time()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(spent)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            spent = bool(flag.item())
        if spent and not getattr(self, "_told_out_of_time", False):
            self._told_out_of_time = True
            where = f"after batch {self.step} of this epoch" if self.step else "at the end of this epoch"
            logger.info("The %.2f-minute budget is spent: training stops %s", counter.max_minutes, where)
        return spent

    def on_fit_batch_start(self, batch, should_step):
        """The Noam rate is set before the optimiser step it applies to (see `DuplexBrain.on_fit_batch_start`),
        then multiplied by each parameter group's `lr_scale` (the scheduler sets one rate for every group)."""
        if should_step:
            self.hparams.noam_annealing(self.optimizer)
            apply_lr_scales(self.optimizer)

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        self.train_losses.append(float(loss.detach()))

    def log_and_save_epoch(self, valid_stats, epoch, **selection):
        """The epoch's line in the train log, then its checkpoint; ``keep_checkpoints`` are kept, ranked by
        ``selection`` (min_keys/max_keys; none: the most recent)."""
        self.hparams.train_logger.log_stats(
            stats_meta={"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"], "steps": self.optimizer_step},
            train_stats=self.train_stats, valid_stats=valid_stats)
        self.checkpointer.save_and_keep_only(meta={**valid_stats, "epoch": epoch},
                                             num_to_keep=self.hparams.keep_checkpoints, **selection)

    def delete_intra_epoch_checkpoints(self):
        """Once an epoch is saved, its intra-epoch checkpoint (from --ckpt_interval_*) is stale. SpeechBrain keeps
        it (it carries no selection key), and the next stage would average it in with the end-of-epoch ones."""
        self.checkpointer.delete_checkpoints(
            num_to_keep=0, ckpt_predicate=lambda ckpt: INTRA_EPOCH_CKPT_FLAG in ckpt.meta)

    def selection_keys(self):
        """min_keys/max_keys for the YAML's selection_key (none: most recent)."""
        key = self.hparams.selection_key
        if key is None:
            return {}
        return {f"{self.hparams.selection_mode}_keys": [key]}


def apply_lr_scales(optimizer):
    """Each parameter group's rate times its `lr_scale` (1 where it has none); call right after the scheduler,
    which gives every group the same rate."""
    for group in optimizer.param_groups:
        group["lr"] *= group.get("lr_scale", 1.0)


def scaled_param_groups(parts, all_parameters, lr_scales, trained):
    """Optimiser parameter groups: every parameter of a part at factor 1 first (its rate is the one logged), then
    one group per part at another factor, with that `lr_scale`.

    Why the checks: a factor on a frozen or misspelt part would silently do nothing, and a trained part at
    factor 0 is frozen in all but name."""
    scaled = {name: float(factor) for name, factor in lr_scales.items() if float(factor) != 1.0}
    unknown = sorted(set(lr_scales) - set(parts))
    untrained = sorted(set(scaled) - set(trained))
    if unknown or untrained:
        raise ValueError(f"lr_scales: {unknown or untrained} {'are no parts' if unknown else 'are not trained'} "
                         f"(parts {sorted(parts)}, trained {list(trained)}); give a factor other than 1 only to a "
                         "part this stage trains.")
    scaled_ids = set()
    groups = []
    for name, factor in scaled.items():
        if not factor > 0:
            raise ValueError(f"lr_scales[{name}] = {factor}: a factor must be above 0 (freeze the part instead).")
        params = list(parts[name].parameters())
        scaled_ids.update(id(param) for param in params)
        groups.append({"params": params, "lr_scale": factor})
    rest = [param for param in all_parameters if id(param) not in scaled_ids]
    return [{"params": rest, "lr_scale": 1.0}, *groups]


def model_parts(hparams):
    """Name -> module for the parts a stage can train or freeze."""
    model, encoder = hparams["model"], hparams["speech_encoder"]
    return {"cnn": model.cnn, "encoder": model.encoder, "adapter": model.adapter, "lm": model.lm,
            "normalizer": encoder.normalizer}


def check_part_lists(trained, frozen):
    """Each part must be declared exactly once, trained or frozen (a typo must not silently train the LM)."""
    declared = list(trained) + list(frozen)
    unknown = sorted(set(declared) - set(PART_NAMES))
    twice = sorted({name for name in declared if declared.count(name) > 1})
    missing = sorted(set(PART_NAMES) - set(declared))
    if unknown or twice or missing:
        raise ValueError(f"trained_modules/frozen_modules in the stage YAML must list each of {PART_NAMES} once; "
                         f"unknown {unknown}, listed twice {twice}, missing {missing}.")


class DuplexBrain(TrainingBrain):
    """Train / validate / test one stage; see the module docstring for the YAML keys it reads."""

    def __init__(self, modules=None, opt_class=None, hparams=None, run_opts=None, checkpointer=None):
        check_part_lists(hparams["trained_modules"], hparams["frozen_modules"])
        self.parts = model_parts(hparams)
        self.duplex = modules["duplex"]  # unwrapped: Brain replaces modules["duplex"] by its DDP wrapper
        for name in hparams["frozen_modules"]:
            self.parts[name].requires_grad_(False)
        for name in hparams["trained_modules"]:
            self.parts[name].requires_grad_(True)
        super().__init__(modules, opt_class, hparams, run_opts, checkpointer)  # counts trainable parameters
        self.text_ids = TextIds(self.hparams.tokenizer, self.hparams.stage)
        self.epoch = 0
        self.stats = None
        self.train_losses = []
        self.stop = GracefulStop()  # run_stage gives the one whose signal handlers are installed
        self.prompt_draws = PromptDraws(self.hparams.seed, train=True)  # run_stage gives the datasets' one
        self.random_states = RandomStates()
        if self.checkpointer is not None:  # optional: checkpoints of older versions have no random states
            self.checkpointer.add_recoverable("random_states", self.random_states, optional_load=True)

    def init_optimizers(self):
        """SpeechBrain's single optimiser, with a parameter group of its own for each part whose `lr_scales` factor
        is not 1 (`scaled_param_groups`)."""
        lr_scales = getattr(self.hparams, "lr_scales", None) or {}
        if all(float(factor) == 1.0 for factor in lr_scales.values()) or self.opt_class is None:
            return super().init_optimizers()
        if self.remove_vector_weight_decay:
            raise ValueError("lr_scales and remove_vector_weight_decay cannot be combined here; drop one.")
        groups = scaled_param_groups(self.parts, self.modules.parameters(), lr_scales,
                                     self.hparams.trained_modules)
        self.optimizer = self.opt_class(groups)
        self.optimizers_dict = {"opt_class": self.optimizer}
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("optimizer", self.optimizer)

    # ---- forward / loss -------------------------------------------------------------------------------------
    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig  # (B, N), (B,)
        if stage == sb.Stage.TRAIN and self.hparams.speed_perturb is not None:
            wavs = self.hparams.speed_perturb(wavs)  # (B, N')
        if stage == sb.Stage.TRAIN and self.hparams.gain_perturb is not None:
            wavs = self.hparams.gain_perturb(wavs)  # (B, N'), each row at its own level
        with_state = self.hparams.stage >= 3
        texts = {"prefix_ids": batch.prefix_ids, "suffix_ids": batch.suffix_ids,
                 "response_ids": batch.response_ids,
                 "state_ids": batch.state_id.tolist() if with_state else None,
                 "assistant_ids": self.text_ids.assistant_ids if with_state else ()}
        context_wavs = context_lens = None
        if with_state and hasattr(batch, "context_turns"):  # multi-turn rows: earlier turns (src/sequence.py)
            texts["context"], context_wavs, context_lens = flatten_context(batch.context_turns, batch.context_wavs)
            texts.update(join_ids=self.text_ids.join_ids, reply_head_ids=self.text_ids.reply_head_ids)
            if context_wavs is not None:
                context_wavs, context_lens = context_wavs.to(self.device), context_lens.to(self.device)
        return self.modules.duplex(wavs, wav_lens, texts, epoch=self.epoch, context_wavs=context_wavs,
                                   context_wav_lens=context_lens)

    def compute_objectives(self, predictions, batch, stage):
        logits, sequence = predictions
        loss = compute_loss(self.hparams.loss_mode, logits, sequence.labels, sequence.state_mask,
                            self.hparams.label_smoothing)
        alignment = getattr(self.hparams, "alignment_ctc", None)
        if alignment and alignment["weight"] > 0 and stage == sb.Stage.TRAIN:
            loss = loss + alignment["weight"] * self.alignment_loss(sequence, batch, alignment["scale"])
        if stage != sb.Stage.TRAIN:
            self.stats.append(logits, sequence.labels, sequence.state_mask)
        if stage == sb.Stage.TEST and self.hparams.test_max_new_tokens > 0:
            self.score_transcripts(batch)
        return loss

    def alignment_loss(self, sequence, batch, scale):
        """`alignment_ctc` (src/objectives.alignment_ctc_loss) on the ASR rows: their transcripts' ids."""
        targets = [ids if task == TASK_ASR else [] for ids, task in zip(batch.response_ids, batch.task)]
        return alignment_ctc_loss(sequence.speech, sequence.speech_lens, targets,
                                  self.duplex.lm.model.get_input_embeddings().weight, scale)

    @torch.no_grad()
    def score_transcripts(self, batch):
        """WER of greedy transcripts on the ASR rows, each decoded from its own prompt (fixes spec §8.9).

        Stages 3-4 decode after the reference state token and "\n<|assistant|>\n" (the state decision itself
        is scored by STATE_ACC).
        """
        rows = [b for b, task in enumerate(batch.task) if task == TASK_ASR]
        if not rows:
            return
        wavs, wav_lens = batch.sig
        duplex = self.duplex
        speech, speech_lens = duplex.encode_speech(wavs[rows], wav_lens[rows])  # (R, P, H), (R,)
        with_state = self.hparams.stage >= 3
        prompts = build_sequences(
            duplex.lm.embed, [batch.prefix_ids[b] for b in rows], speech, speech_lens,
            [batch.suffix_ids[b] for b in rows],
            state_ids=[int(batch.state_id[b]) for b in rows] if with_state else None,
            assistant_ids=self.text_ids.assistant_ids if with_state else ())
        runtime = TorchMambaRuntime(duplex.lm.model)
        row_prompts = [prompts.inputs_embeds[i, : int(prompts.lengths[i])] for i in range(len(rows))]  # (L_i, H)
        decoded = greedy_decode(runtime, row_prompts, self.hparams.test_max_new_tokens)
        for b, ids in zip(rows, decoded):
            hypothesis = self.hparams.tokenizer.decode(ids, skip_special_tokens=True)
            self.wer_stats.append([batch.id[b]], [hypothesis.lower().split()], [batch.response[b].lower().split()])

    # ---- stopping and resuming ------------------------------------------------------------------------------
    def fit(self, *args, **kwargs):
        """A stop signal during fit saves a checkpoint first (src/run_control.py)."""
        self.stop.in_training = True
        try:
            return super().fit(*args, **kwargs)
        finally:
            self.stop.in_training = False

    def stop_requested(self):
        """Whether any process got a stop signal (all processes must agree: the save is collective)."""
        requested = self.stop.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(requested)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            requested = bool(flag.item())
        return requested

    def _should_save_intra_epoch_ckpt(self, last_ckpt_time, steps_since_ckpt):
        return self.stop_requested() or super()._should_save_intra_epoch_ckpt(last_ckpt_time, steps_since_ckpt)

    def _save_intra_epoch_ckpt(self):
        super()._save_intra_epoch_ckpt()
        if self.stop_requested():
            raise TrainingStopped(self.stop.signum or signal.SIGTERM)

    # ---- hooks ----------------------------------------------------------------------------------------------
    def on_fit_start(self):
        """Hand-off from the previous stage only for a fresh run, before DDP wrapping and optimiser creation."""
        if self.checkpointer is None or not self.checkpointer.list_checkpoints():
            load_previous_stage(self.hparams.init_from, self.hparams.model, self.hparams.speech_encoder.normalizer)
        super().on_fit_start()

    def on_fit_batch_start(self, batch, should_step):
        """Frozen parts stay in eval mode (Brain.fit switches every module to train mode each epoch).

        The Noam rate is set before the optimiser step it applies to, so optimiser step n runs at lr(n) and the
        first one at lr_peak / warmup_steps. The reference stepped the scheduler after the update, so its first
        step ran at the optimiser's initial rate, the full peak, before any warm-up.
        """
        self.random_states.apply_pending()  # resumed from an intra-epoch checkpoint: its states start here
        for name in self.hparams.frozen_modules:
            self.parts[name].eval()
        super().on_fit_batch_start(batch, should_step)  # TrainingBrain: the Noam rate

    def on_stage_start(self, stage, epoch=None):
        if epoch is not None:
            self.epoch = epoch
        if stage == sb.Stage.TRAIN:
            self.prompt_draws.epoch = epoch
        if stage == sb.Stage.VALID:  # an intra-epoch checkpoint taken after the epoch's last training step
            self.random_states.apply_pending()
        if stage != sb.Stage.TRAIN:
            self.stats = TeacherForcedStats()
            self.wer_stats = ErrorRateStats()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        stage_stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stage_stats
            return
        stage_stats.update(self.stats.summarize())
        if self.wer_stats.scores:
            stage_stats["WER"] = self.wer_stats.summarize("error_rate")
        if stage == sb.Stage.VALID:
            self._end_of_epoch(stage_stats, epoch)
        else:
            self.hparams.train_logger.log_stats(stats_meta=self.tested_epochs(), test_stats=stage_stats)
            self.write_transcripts()
        self.last_stage_stats = stage_stats

    def write_transcripts(self):
        """The test's greedy transcripts beside the train log (`wer_<test>.txt`: every utterance's alignment, as
        SpeechBrain's recipes write it), so that a WER can be read, not only believed."""
        if not self.wer_stats.scores or not sb.utils.distributed.if_main_process():
            return
        path = pathlib.Path(self.hparams.output_folder) / f"wer_{getattr(self, 'test_name', 'test')}.txt"
        with open(path, "w") as stream:
            self.wer_stats.write_stats(stream)

    def _end_of_epoch(self, valid_stats, epoch):
        self.log_and_save_epoch(valid_stats, epoch, **self.selection_keys())
        self.delete_intra_epoch_checkpoints()
        if self.stop_requested():  # the signal came during validation: this checkpoint is the one to resume
            raise TrainingStopped(self.stop.signum or signal.SIGTERM)

    def on_evaluate_start(self, max_key=None, min_key=None):
        """Test on the average of the `test_average` best (or latest) end-of-epoch checkpoints."""
        self.tested_checkpoints = average_into(
            self.checkpointer, self.hparams.model, self.hparams.speech_encoder.normalizer,
            self.hparams.test_average, self.hparams.selection_key, self.hparams.selection_mode)

    def tested_epochs(self):
        """The epochs of the checkpoints the test loaded (not the counter's last epoch, which may differ)."""
        epochs = [ckpt.meta.get("epoch") for ckpt in self.tested_checkpoints]
        if len(epochs) == 1:
            return {"Epoch loaded": epochs[0]}
        return {"Epochs averaged": ",".join(str(epoch) for epoch in epochs)}
