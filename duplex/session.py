"""The duplex decoding state machine (paper §3.3): one conversation, fed one time slice at a time.

Two kinds of branch, each just a ``MambaState`` over the one shared set of weights:

* the **speaker** holds the conversation so far and, while replying, generates ``tokens_per_slice``
  tokens per slice;
* the **listener** is forked from the speaker (or from the empty state) when the user starts
  speaking; each speech slice is added to it, then the state token is predicted on a *fork* of it
  with ``<|endofspeech|>`` appended, so the kept listener state is exactly context + speech.

State token of the probe:

* ``<|endofuser|>`` (respond): the probe fork becomes the speaker (interrupted reply abandoned);
* ``<|ignore|>``: the listener is dropped; the speaker continues exactly where it was (or, with no
  conversation yet, the session is back at its empty start);
* ``<|incomplete|>`` (or any other token): keep listening on the next slice.

Silence after speech forces a reply (the reference's behaviour; ``force_reply_on_silence``), and
``finish()`` forces and completes the last reply.

The session decides; it does not compute. Each slice is a generator (``_slice_job``) that yields the model
work it needs (``duplex/work.py``: encode, prefill / probe, step, fork, release, sample) and gets the results
back; ``duplex.scheduler.Scheduler`` runs the work of all its sessions batched. ``feed`` / ``finish`` are the
N = 1 case: a scheduler holding this session alone. Choices where the reference is buggy (spec §6.3):
a reply's EOS is fed to its state when sampled, so the next turn joins with "\\n" + user prompt; an
interrupted reply is closed with its unfed last token + EOS + "\\n" + user prompt (the paper's
"<eos><|user|>" join), so every turn boundary looks the same to the LM.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from duplex import events as ev
from duplex.events import Event, Turn
from duplex.sampling import SamplingConfig
from duplex.work import Encode, Fork, NewState, Prefill, Release, Sample, Step


def _checked_slice(wav) -> torch.Tensor:
    """A speech slice as (N,) float32, refusing what would silently poison the conversation state."""
    wav = torch.as_tensor(wav)
    if wav.dim() > 1 and wav.numel() != max(wav.shape):
        raise ValueError(f"DuplexSession.feed: expected mono audio (N,), got shape {tuple(wav.shape)}; "
                         "downmix first (src.audio.to_mono_16k).")
    if not wav.is_floating_point():
        raise ValueError(f"DuplexSession.feed: expected float samples in [-1, 1], got {wav.dtype}; "
                         "scale integer PCM first (int16: divide by 32768).")
    if not torch.isfinite(wav).all():
        raise ValueError("DuplexSession.feed: the slice contains NaN or infinite samples; they would corrupt the "
                         "conversation state for good. Clean the audio source.")
    return wav.reshape(-1).float()  # (N,)


LISTENER_CONTEXTS = ("conversation", "none")


@dataclass(frozen=True)
class DuplexConfig:
    """Timing, sampling and caps of a duplex session (the ``duplex:`` block of duplex/duplex*.yaml)."""

    slice_seconds: float = 3.0  # length of a user time slice
    merge_short_tail: bool = True  # a last piece shorter than a slice joins the previous slice
    tokens_per_slice: int = 4  # reply tokens generated per slice
    state_sampling: SamplingConfig = SamplingConfig(temperature=0.95, top_p=0.75, top_k=50)
    reply_sampling: SamplingConfig = SamplingConfig(temperature=0.8, top_p=0.7, top_k=50)
    silent_slices_between_wavs: int = 4  # --wav mode: silent slices after each file
    max_branch_tokens: int = 1024  # tokens one branch may consume (prompt + speech + reply) before it stops
    force_reply_on_silence: bool = True  # silence after speech starts a reply even without <|endofuser|>
    state_tokens_only: bool = True  # probe samples among the 3 state tokens (the reference: whole vocabulary)
    seed: int = 3407
    sample_rate: int = 16000
    # what a new user turn is heard on: "conversation" = a fork of the speaker, i.e. everything said so far (the
    # paper); "none" = the empty state, as each turn's first one (for a model trained on single turns only)
    listener_context: str = "conversation"

    def __post_init__(self):
        if self.slice_seconds <= 0 or self.tokens_per_slice < 1 or self.max_branch_tokens < 1:
            raise ValueError("DuplexConfig: slice_seconds must be > 0, tokens_per_slice and max_branch_tokens "
                             f">= 1; got {self.slice_seconds}, {self.tokens_per_slice}, {self.max_branch_tokens}.")
        if self.listener_context not in LISTENER_CONTEXTS:
            raise ValueError(f"DuplexConfig: listener_context must be one of {list(LISTENER_CONTEXTS)}; "
                             f"got {self.listener_context!r}.")

    @classmethod
    def from_dict(cls, values: dict, source: str = "duplex config") -> "DuplexConfig":
        """Build from a YAML mapping; unknown keys are an error (a typo must not be silently ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown} in the duplex block; known keys: {sorted(known)}.")
        values = dict(values)
        for key in ("state_sampling", "reply_sampling"):
            if isinstance(values.get(key), dict):
                try:
                    values[key] = SamplingConfig(**values[key])
                except TypeError as error:
                    raise ValueError(f"{source}: duplex.{key}: {error}; use temperature, top_p, top_k, greedy.")
        _check_value_types(cls, values, source)
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{source}: duplex block: {error}") from error


def _check_value_types(config_class, values: dict, source: str) -> None:
    """YAML values must have the type of the field's default (``tokens_per_slice: four`` is an error, not a crash)."""
    for spec in dataclasses.fields(config_class):
        if spec.name not in values:
            continue
        value, default = values[spec.name], spec.default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and (isinstance(default, float) or float(value).is_integer())
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ValueError(f"{source}: duplex.{spec.name} must be of type {type(default).__name__} (like "
                             f"{default!r}), got {value!r}.")


@dataclass(frozen=True)
class TurnPrompts:
    """Prompt strings of a duplex turn (spec §2, inference); defaults come from ``src.prompts``."""

    user: str  # opens a user turn, ends with the begin-of-speech marker
    end_of_speech: str
    assistant: str  # between the state token and the reply
    respond: str  # state tokens
    incomplete: str
    ignore: str
    eos: str = "<|endoftext|>"
    newline: str = "\n"

    @classmethod
    def default(cls) -> "TurnPrompts":
        from src import prompts  # the one place the prompt strings live
        return cls(user=prompts.INFERENCE_PROMPT, end_of_speech=prompts.END_OF_SPEECH,
                   assistant=prompts.ASSISTANT_PROMPT, respond=prompts.RESPONSE,
                   incomplete=prompts.INCOMPLETE, ignore=prompts.IGNORE)


@dataclass(frozen=True)
class TurnTokens:
    """``TurnPrompts`` tokenised once (the session only ever feeds these ids)."""

    user: tuple[int, ...]
    end_of_speech: tuple[int, ...]
    assistant: tuple[int, ...]
    newline: tuple[int, ...]
    eos: int
    respond: int
    incomplete: int
    ignore: int

    @property
    def state_ids(self) -> tuple[int, int, int]:
        return (self.respond, self.incomplete, self.ignore)

    @classmethod
    def from_tokenizer(cls, tokenizer, prompts: TurnPrompts) -> "TurnTokens":
        def ids(text):
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        def single(text):
            found = ids(text)
            if len(found) != 1:
                raise ValueError(f"TurnTokens: {text!r} must be one token of the tokenizer, got ids {found}; "
                                 "load the tokenizer with the state tokens added (modules.tokenizer.load_tokenizer).")
            return found[0]

        return cls(user=ids(prompts.user), end_of_speech=ids(prompts.end_of_speech),
                   assistant=ids(prompts.assistant), newline=ids(prompts.newline), eos=single(prompts.eos),
                   respond=single(prompts.respond), incomplete=single(prompts.incomplete),
                   ignore=single(prompts.ignore))


@dataclass
class _Branch:
    """One conversation branch: its state and what it is doing with it."""

    state: object  # MambaState (made and released by the runtime)
    start_tokens: int  # state.seqlen[0] when the branch was forked (for max_branch_tokens)
    user_turn: Turn
    pending: int | None = None  # token chosen but not fed yet
    next_logits: torch.Tensor | None = None  # (1, V) after ``pending`` was fed early (with a listener's slice)
    reply_ids: list[int] = field(default_factory=list)
    reply_turn: Turn | None = None
    emitted: str = ""  # reply text already reported
    finished: bool = False

    @property
    def tokens(self) -> int:
        return self.state.seqlen[0] - self.start_tokens


class DuplexSession:
    """One duplex conversation over a shared ``Runtime``; all its state lives on this object.

    It never calls the model: its slices are generators of work requests that a ``Scheduler`` executes
    (batched with other sessions' work, or alone through ``feed`` / ``finish``).

    Parameters
    ----------
    runtime : duplex.runtime.Runtime
        The LM backend (weights shared by every session and branch).
    speech_encoder : callable or object with ``encode_wav``
        wav (N,) float32 16 kHz -> speech embeddings (1, P, H); P may be 0. Used by ``feed``'s scheduler.
    tokenizer : object with ``encode(text, add_special_tokens=False)`` and ``decode(ids)``.
    config : DuplexConfig
    prompts : TurnPrompts, optional
        Defaults to the strings of ``src.prompts``.
    """

    def __init__(self, runtime, speech_encoder, tokenizer, config: DuplexConfig,
                 prompts: TurnPrompts | None = None):
        self.runtime = runtime
        self._encode: Callable = speech_encoder
        self.tokenizer = tokenizer
        self.config = config
        self.tokens = TurnTokens.from_tokenizer(tokenizer, prompts or TurnPrompts.default())
        device = getattr(runtime, "device", torch.device("cpu"))
        # Separate streams: probing a listener must not shift the speaker's samples (an ignored
        # interruption then leaves the reply token-for-token unchanged).
        self._state_generator = torch.Generator(device=device).manual_seed(config.seed)
        self._reply_generator = torch.Generator(device=device).manual_seed(config.seed + 1)
        self._speaker: _Branch | None = None
        self._listener: _Branch | None = None
        self._slice_index = 0
        self._clock_s = 0.0
        self.transcript: list[Turn] = []
        self._scheduler = None  # the Scheduler this session is in (feed() makes one of its own)
        self._own_scheduler = False

    # ------------------------------------------------------------------ public API (N = 1)
    def feed(self, wav: torch.Tensor | None, label: str | None = None,
             duration_s: float | None = None) -> list[Event]:
        """Process one slice: ``wav`` (N,) speech, or None for a silent slice. Returns its event."""
        scheduler = self._solo_scheduler()
        scheduler.submit(self, wav, label=label, duration_s=duration_s)
        return self._solo_tick(scheduler)

    def finish(self) -> list[Event]:
        """End of input: force a reply to any open user turn and generate it to EOS or the cap.

        Returns one "final" event per ``tokens_per_slice`` chunk (none when nothing was pending).
        """
        scheduler = self._solo_scheduler()
        scheduler.submit_finish(self)
        events = []
        while scheduler.has_work():
            events += self._solo_tick(scheduler)
        return events

    @property
    def speaking(self) -> bool:
        """True while a reply is being generated."""
        return self._speaker is not None and not self._speaker.finished

    @property
    def listening(self) -> bool:
        """True while a user turn is open (state token incomplete so far)."""
        return self._listener is not None

    def close(self) -> None:
        """Give the branches' states back to the runtime (pool rows on the GPU backend), through the scheduler
        that holds this session."""
        if self._scheduler is not None:
            self._scheduler.remove(self)
        else:  # in no scheduler (never fed, e.g. just restored from a snapshot): give the states back here
            self.runtime.release_many(self._take_branches())

    def conversation_text(self) -> str:
        """The transcript, one turn per line."""
        return "\n".join(turn.render() for turn in self.transcript)

    def _solo_scheduler(self):
        """The scheduler of ``feed`` / ``finish``: this session alone (made on first use)."""
        if self._scheduler is None:
            from duplex.scheduler import Scheduler
            Scheduler(self.runtime, self._encode).add(self)
            self._own_scheduler = True
        elif not self._own_scheduler:
            raise RuntimeError("DuplexSession.feed/finish: this session is driven by a shared Scheduler; submit "
                               "its slices there (scheduler.submit / submit_finish / tick).")
        return self._scheduler

    def _solo_tick(self, scheduler) -> list[Event]:
        events = [event for _, event in scheduler.tick()]
        if self in scheduler.failures:  # alone, an error is the caller's
            raise scheduler.failures.pop(self)
        return events

    def _take_branches(self) -> list:
        """The states this session holds (speaker, listener), handed over for release; the session forgets them."""
        states = [branch.state for branch in (self._listener, self._speaker) if branch is not None]
        self._listener = self._speaker = None
        return states

    # ------------------------------------------------------------------ jobs (generators of work requests)
    def _slice_job(self, wav: torch.Tensor | None, label: str | None, duration_s: float | None):
        """One slice (``wav`` already checked, or None = silence); returns its event."""
        if wav is None:
            duration = self.config.slice_seconds if duration_s is None else duration_s
            event = self._new_event("silence", duration, label)
            yield from self._on_silence(event)
        else:
            duration = wav.numel() / self.config.sample_rate if duration_s is None else duration_s
            event = self._new_event("speech", duration, label)
            yield from self._on_speech(wav, event)
        event.text = yield from self._generate(self.config.tokens_per_slice, event)
        self._clock_s += duration
        return event

    def _final_job(self):
        """One chunk of the final round: force an open turn, then ``tokens_per_slice`` reply tokens; returns the
        "final" event, or None when nothing is pending (no turn open, no reply running)."""
        if self._listener is None and not self.speaking:
            return None
        event = self._new_event("final", 0.0)
        if self._listener is not None:
            yield from self._start_reply(self._listener, probe_state=None, event=event, forced=True)
        event.text = yield from self._generate(self.config.tokens_per_slice, event)
        return event

    # ------------------------------------------------------------------ slice handlers
    def _new_event(self, kind: str, duration: float, label: str | None = None) -> Event:
        event = Event(slice_index=self._slice_index, start_s=round(self._clock_s, 3),
                      duration_s=round(duration, 3), input=kind, label=label)
        self._slice_index += 1
        return event

    def _on_silence(self, event: Event):
        if self._listener is not None and self.config.force_reply_on_silence:
            yield from self._start_reply(self._listener, probe_state=None, event=event, forced=True)

    def _on_speech(self, wav: torch.Tensor, event: Event):
        speech = (yield Encode(wav)) if wav.numel() > 0 else None  # (1, P, H)
        positions = 0 if speech is None else speech.shape[1]
        event.speech_positions = positions
        if positions == 0:
            return  # nothing the LM could read: no turn is opened, nothing is probed
        prefix = ()
        if self._listener is None:
            self._listener, prefix = yield from self._fork_listener(event)
        self._listener.user_turn.text += (" " if self._listener.user_turn.text else "") + (event.label or "<speech>")
        token, probe_state = yield from self._probe(self._listener, prefix, speech)
        event.state_token_id = token
        event.state_token = self.tokenizer.decode([token])
        if token == self.tokens.respond:
            yield from self._start_reply(self._listener, probe_state=probe_state, event=event, forced=False)
        elif token == self.tokens.ignore:
            yield from self._drop_listener(event)

    # ------------------------------------------------------------------ branch operations
    def _fork_listener(self, event: Event):
        """Open a user turn on a copy of the conversation: [close the reply] + user prompt; or, with
        ``listener_context: none``, on the empty state + user prompt (the speaker is left as it is).
        Returns (the listener, the prefix ids it still has to take: they go with the first slice's chunk)."""
        speaker = self._speaker
        if speaker is None or self.config.listener_context == "none":
            state, prefix = (yield NewState()), tuple(self.tokens.user)
        else:
            state = yield Fork(speaker.state)
            tail = () if speaker.pending is None else (speaker.pending,)  # sampled, shown, not fed yet
            closing = tail + (() if self._reply_closed(speaker) else (self.tokens.eos,))
            prefix = closing + tuple(self.tokens.newline) + tuple(self.tokens.user)
        turn = Turn("user", event.start_s)
        self.transcript.append(turn)
        event.changes.append(ev.LISTEN_START)
        return _Branch(state=state, start_tokens=state.seqlen[0], user_turn=turn), prefix

    def _reply_closed(self, speaker: _Branch) -> bool:
        """True when the speaker's EOS is already in its state (reply ended normally)."""
        return speaker.finished and speaker.pending is None

    def _probe(self, listener: _Branch, prefix: tuple, speech: torch.Tensor):
        """Add [prefix +] the slice to the listener and predict the state token on a fork + <|endofspeech|>
        (the listener never sees the marker): one probe request, a fork inside the pass."""
        chunk = (prefix, speech, tuple(self.tokens.end_of_speech))
        probe = Prefill(listener.state, chunk, fork_at=len(prefix) + speech.shape[1])
        speaker = self._speaker
        if self._will_generate(speaker):  # the speaker's next token goes in the same round
            (probe_state, logits), speaker.next_logits = yield probe, Step(speaker.state, speaker.pending)
        else:
            probe_state, logits = yield probe
        among = self.tokens.state_ids if self.config.state_tokens_only else None
        token = yield Sample(logits, self.config.state_sampling, self._state_generator, among)
        if token != self.tokens.respond:
            yield Release(probe_state)
            probe_state = None
        return token, probe_state

    def _start_reply(self, listener: _Branch, probe_state, event: Event, forced: bool):
        """Turn the listener into the speaker: [<|endofspeech|>] <|endofuser|> + assistant prompt."""
        if probe_state is None:  # forced: no probe fork was kept, add the marker now
            probe_state, head = listener.state, tuple(self.tokens.end_of_speech)
        else:
            head = ()
        ids = head + (self.tokens.respond,) + tuple(self.tokens.assistant)
        yield Prefill(probe_state, (ids[:-1],))
        released = [] if probe_state is listener.state else [listener.state]
        listener.state, listener.pending = probe_state, ids[-1]
        old = self._speaker
        if old is not None and not old.finished:
            old.reply_turn.status = "interrupted"
            event.changes.append(ev.INTERRUPT)
        if old is not None:
            released.append(old.state)  # the new speaker's state already holds the conversation
        if released:
            yield tuple(Release(state) for state in released)
        listener.user_turn.status = "answered"
        listener.reply_turn = Turn("assistant", event.start_s, status="speaking")
        self.transcript.append(listener.reply_turn)
        self._speaker, self._listener = listener, None
        event.changes.append(ev.REPLY_START)
        if forced:
            event.changes.append(ev.FORCED_REPLY)

    def _drop_listener(self, event: Event):
        """<|ignore|>: discard the listener; with no conversation before it, this is a reset."""
        self._listener.user_turn.status = "ignored"
        state, self._listener = self._listener.state, None
        yield Release(state)
        event.changes.append(ev.IGNORED)
        if self._speaker is None:
            event.changes.append(ev.RESET)

    def _generate(self, n_tokens: int, event: Event):
        """Let the speaker produce up to ``n_tokens`` tokens; returns the newly emitted text."""
        speaker = self._speaker
        if speaker is None or speaker.finished:
            return ""
        for _ in range(n_tokens):
            if speaker.next_logits is not None:  # pending already fed (see _will_generate)
                logits, speaker.next_logits = speaker.next_logits, None
            elif speaker.tokens >= self.config.max_branch_tokens:
                self._end_reply(speaker, "truncated", ev.REPLY_TRUNCATED, event)
                break
            else:
                logits = yield Step(speaker.state, speaker.pending)  # (1, V)
            token = yield Sample(logits, self.config.reply_sampling, self._reply_generator)
            if token == self.tokens.eos:
                yield Step(speaker.state, token)  # EOS goes into the state now (see module doc)
                speaker.pending = None
                self._end_reply(speaker, "complete", ev.REPLY_END, event)
                break
            speaker.reply_ids.append(token)
            speaker.pending = token
        return self._new_text(speaker)

    def _will_generate(self, speaker: _Branch | None) -> bool:
        """Whether this slice's ``_generate`` will feed ``speaker.pending`` first (so it may be fed early,
        together with the listener's slice: the branches are independent, the samples come later in the
        same order). If the probe then hands the turn to a new speaker, the old one is dropped anyway."""
        return speaker is not None and not speaker.finished and speaker.pending is not None \
            and self.config.tokens_per_slice >= 1 and speaker.tokens < self.config.max_branch_tokens

    def _end_reply(self, speaker: _Branch, status: str, change: str, event: Event) -> None:
        speaker.finished = True
        speaker.reply_turn.status = status
        event.changes.append(change)

    def _new_text(self, speaker: _Branch) -> str:
        """Text of the reply not reported yet (a trailing partial UTF-8 character waits for the next token)."""
        text = self.tokenizer.decode(speaker.reply_ids)
        if not speaker.finished:
            text = text.rstrip("\ufffd")
        shared = len(os.path.commonprefix([text, speaker.emitted]))  # all of it unless decoding re-segmented
        new, speaker.emitted = text[shared:], text
        speaker.reply_turn.text = text
        return new
