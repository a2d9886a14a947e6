"""One scheduler runs the model work of many duplex conversations together (1 is the N = 1 case).

A ``DuplexSession`` decides; it does not compute. Each submitted slice becomes a generator of work requests
(``duplex/work.py``). ``tick()`` drives every session's generator in rounds:

1. collect each session's next request (one request, or a tuple of model requests for the same round);
2. answer the cheap ones first, batched, and collect again until only model work is left: forks
   (``runtime.fork_many``: pool-row copies on the GPU), new states, releases and token choices (every greedy
   choice of the round in one argmax; a sampled one with its session's own generator);
3. run the round's model work, one batched call per kind: one encoder pass over all slices that arrived
   (grouped by length, so no slice is padded and each is encoded exactly as alone), one variable-length prefill
   over all chunks onto their rows (probe forks inside the pass: ``runtime.prefill_many``), one decode step over
   all speakers (``runtime.step_many``);
4. send every result back and repeat, until every submitted slice is done.

Events come out in order per session: all events of the slices submitted before the tick, and one "final"
event per tick for a session whose end of input was submitted (the final reply streams like any slice).
Rows: a session holds up to three branches inside a tick (speaker, listener, the probe fork), two between ticks.
"""
from __future__ import annotations

import collections
import statistics
import time
from dataclasses import dataclass

import torch

from duplex.events import Event
from duplex.sampling import sample, sample_among
from duplex.session import DuplexSession, _checked_slice
from duplex.work import CHEAP, COMPUTE, Encode, Fork, NewState, Prefill, Release, Sample, Step

_FINISH = "finish"


@dataclass
class _Job:
    """What one session runs now: a slice or a chunk of its final round, as a generator of requests."""

    kind: str  # "slice" | "finish" | "work" (Scheduler.run)
    work: object  # the generator
    parts: tuple = ()  # the requests it waits for
    bundle: bool = False  # it yielded a tuple (gets a tuple back)
    cheap: bool = False  # only cheap requests (answered between rounds)
    results: list | None = None

    def wait_for(self, request) -> None:
        """Record a yielded request (one, or a tuple of only cheap or only model requests)."""
        kind = _KIND.get(type(request))
        if kind is not None:  # one request (the common case, kept cheap: this runs per session and round)
            self.bundle, self.parts, self.cheap, self.results = False, (request,), kind == "cheap", [None]
            return
        self.bundle = type(request) is tuple
        self.parts = request if self.bundle else (request,)
        kinds = [_KIND.get(type(r)) for r in self.parts]
        if not self.parts or None in kinds or len(set(kinds)) != 1:
            raise TypeError(f"Scheduler: a session yielded {request!r}; expected a work request of duplex.work, or "
                            "a tuple of only cheap (Fork, NewState, Release, Sample) or only model (Encode, "
                            "Prefill, Step) requests.")
        self.cheap = kinds[0] == "cheap"
        self.results = [None] * len(self.parts)

    def answer(self):
        return tuple(self.results) if self.bundle else self.results[0]


class _Drive:
    """The jobs of one tick (or ``run``) by owner, and what to do when one ends: ``done(owner, job, value)``, or
    fails: ``fail(owner, error)`` (None: the error propagates)."""

    def __init__(self, done, fail=None):
        self.running: dict = {}
        self.done = done
        self.fail = fail


class Scheduler:
    """Executes the work requests of every session added to it, batched per kind and round.

    Parameters
    ----------
    runtime : duplex.runtime.Runtime
        The LM backend all sessions share (``prefill_many``, ``step_many``, ``fork_many``, ``release_many``).
    encode : callable or object with ``encode_wav`` (and optionally ``encode_batch``)
        wav (N,) -> (1, P, H); ``encode_batch(wavs (B, N)) -> (B, P, H)`` encodes equal-length slices at once.
    max_sessions : int, optional
        ``add`` refuses more (RuntimeError).
    history : int
        Tick durations kept for ``stats``.

    Example
    -------
    >>> scheduler = Scheduler(engine.runtime, engine.encode)            # doctest: +SKIP
    >>> a, b = engine.new_session(), engine.new_session()               # doctest: +SKIP
    >>> scheduler.add(a); scheduler.add(b)                              # doctest: +SKIP
    >>> scheduler.submit(a, wav); scheduler.submit(b, None)             # doctest: +SKIP
    >>> for session, event in scheduler.tick(): ...                     # doctest: +SKIP
    """

    def __init__(self, runtime, encode, *, max_sessions: int | None = None, history: int = 1000):
        if max_sessions is not None and max_sessions < 1:
            raise ValueError(f"Scheduler: max_sessions must be >= 1 or None, got {max_sessions}.")
        self.runtime = runtime
        self.encode = encode
        self.max_sessions = max_sessions
        self._queues: dict[DuplexSession, collections.deque] = {}  # per session, in the order added
        self._tick_ms: collections.deque[float] = collections.deque(maxlen=history)
        self.rounds = 0  # model rounds run so far (all ticks)
        # sessions whose own step raised during a tick (their queued work is dropped, the others went on);
        # the owner reads and clears it, and removes such a session (its state is not trustworthy any more)
        self.failures: dict[DuplexSession, Exception] = {}

    # ------------------------------------------------------------------ sessions and input
    @property
    def sessions(self) -> list[DuplexSession]:
        return list(self._queues)

    def add(self, session: DuplexSession) -> None:
        """Take ``session`` (made by ``Engine.new_session()`` over this scheduler's runtime)."""
        if session in self._queues:
            raise ValueError("Scheduler.add: this session is already in the scheduler.")
        if session._scheduler is not None:
            raise ValueError("Scheduler.add: this session is already driven by another scheduler (or its own "
                             "feed()); a session belongs to one scheduler.")
        if session.runtime is not self.runtime:
            raise ValueError("Scheduler.add: the session was made over a different runtime; make it with the "
                             "Engine whose runtime this scheduler runs.")
        if self.max_sessions is not None and len(self._queues) >= self.max_sessions:
            raise RuntimeError(f"Scheduler.add: {len(self._queues)} sessions already (max_sessions "
                               f"{self.max_sessions}); remove one first.")
        session._scheduler = self
        self._queues[session] = collections.deque()

    def remove(self, session: DuplexSession) -> None:
        """Drop ``session`` and its queued work; its branches' states go back to the runtime."""
        if self._queues.pop(session, None) is None:
            return
        self.runtime.release_many(session._take_branches())
        session._scheduler = None

    def submit(self, session: DuplexSession, wav, *, label: str | None = None,
               duration_s: float | None = None) -> None:
        """Queue one slice: ``wav`` (N,) float speech, or None for silence. A bad slice (multi-channel, integer
        PCM, NaN) raises ValueError here and leaves the session as it was."""
        queue = self._queue(session)
        checked = None if wav is None else _checked_slice(wav)  # (N,) float32
        queue.append(("slice", checked, label, duration_s))

    def submit_finish(self, session: DuplexSession) -> None:
        """End of input: the pending reply is completed, one "final" event per tick (after the queued slices)."""
        self._queue(session).append((_FINISH,))

    def has_work(self) -> bool:
        return any(self._queues.values())

    def pending(self, session: DuplexSession) -> int:
        """Jobs queued for ``session`` (slices, and its final round until that is over)."""
        return len(self._queue(session))

    def _queue(self, session) -> collections.deque:
        queue = self._queues.get(session)
        if queue is None:
            raise KeyError("Scheduler: this session was not added (Scheduler.add) or was removed.")
        return queue

    # ------------------------------------------------------------------ timing
    @property
    def step_ms(self) -> float | None:
        """Duration of the last tick with work (ms), None before the first."""
        return self._tick_ms[-1] if self._tick_ms else None

    @property
    def stats(self) -> dict:
        """Sessions, ticks kept, and p50 / p99 / last tick duration (ms) over the recent ticks with work."""
        times = sorted(self._tick_ms)
        pick = (lambda q: times[min(len(times) - 1, int(q * len(times)))]) if times else (lambda q: None)
        return {"sessions": len(self._queues), "ticks": len(times), "last_ms": self.step_ms,
                "p50_ms": statistics.median(times) if times else None, "p99_ms": pick(0.99)}

    # ------------------------------------------------------------------ the tick
    @torch.no_grad()
    def tick(self) -> list[tuple[DuplexSession, Event]]:
        """Run all submitted work, batched; returns (session, event) pairs, in order per session.

        An error raised by one session's own step lands in ``failures`` (that session's queue is dropped); an
        error of a batched model call (e.g. the GPU pool has no free row) propagates."""
        if not self.has_work():
            return []
        start = time.perf_counter()
        out: list[tuple[DuplexSession, Event]] = []
        finals = set()  # sessions that produced their "final" event this tick

        def done(session, job, event):
            self._job_done(session, job, event, out, finals)
            self._start_next(session, drive, finals)

        def fail(session, error):
            self._queues[session].clear()
            self.failures[session] = error

        drive = _Drive(done, fail)
        for session in list(self._queues):
            self._start_next(session, drive, finals)
        self._drive(drive)
        self._tick_ms.append((time.perf_counter() - start) * 1e3)
        return out

    @torch.no_grad()
    def run(self, works: list) -> list:
        """Run generators of work requests other than sessions' slices (e.g. CustomGenerator's two passes) to
        their end, batched together like a tick; returns their return values in order."""
        results = {}
        drive = _Drive(lambda owner, job, value: results.__setitem__(owner, value))
        for index, work in enumerate(works):
            self._send(drive, index, _Job("work", work), None)
        self._drive(drive)
        return [results[index] for index in range(len(works))]

    def _drive(self, drive: "_Drive") -> None:
        while drive.running:
            self._answer_cheap(drive)
            if drive.running:
                self._run_model_round(drive)

    def _start_next(self, session, drive: "_Drive", finals) -> None:
        """Start the session's next queued job; run it (and the following ones) until one waits for work."""
        queue = self._queues[session]
        while queue and session not in drive.running:
            entry = queue[0]
            if entry[0] == _FINISH:
                if session in finals:
                    return  # one final chunk per tick
                job = _Job(_FINISH, session._final_job())
            else:
                _, wav, label, duration = entry
                job = _Job("slice", session._slice_job(wav, label, duration))
            self._send(drive, session, job, None)

    def _send(self, drive: "_Drive", owner, job: _Job, value) -> None:
        """Resume ``job`` with ``value``; record what it asks for next, or report its end to ``drive``."""
        try:
            request = job.work.send(value)
            job.wait_for(request)
        except StopIteration as stop:
            drive.running.pop(owner, None)
            drive.done(owner, job, stop.value)
            return
        except Exception as error:  # this session's own logic failed: the others go on
            if drive.fail is None:
                raise
            drive.running.pop(owner, None)
            drive.fail(owner, error)
            return
        drive.running[owner] = job

    def _job_done(self, session, job: _Job, event: Event | None, out, finals) -> None:
        queue = self._queues[session]
        if job.kind == "slice":
            queue.popleft()
            out.append((session, event))
            return
        if event is not None:
            out.append((session, event))
            finals.add(session)
        if event is None or not session.speaking:
            queue.popleft()  # the final round is over

    # ------------------------------------------------------------------ cheap requests
    def _answer_cheap(self, drive: "_Drive") -> None:
        """Answer forks, new states, releases and token choices (batched) until every job waits for model work."""
        while True:
            cheap = [(owner, job) for owner, job in drive.running.items() if job.cheap]
            if not cheap:
                return
            items = [(job, i, r) for _, job in cheap for i, r in enumerate(job.parts)]
            self._release([item for item in items if type(item[2]) is Release])
            self._fork([item for item in items if type(item[2]) in (Fork, NewState)])
            self._sample([item for item in items if type(item[2]) is Sample])
            for owner, job in cheap:
                self._send(drive, owner, job, job.answer())

    def _release(self, items) -> None:
        self.runtime.release_many([r.state for _, _, r in items])
        for job, i, _ in items:
            job.results[i] = None

    def _fork(self, items) -> None:
        forks = [item for item in items if type(item[2]) is Fork]
        for (job, i, _), state in zip(forks, self.runtime.fork_many([r.state for _, _, r in forks])):
            job.results[i] = state
        for job, i, r in items:
            if type(r) is NewState:
                job.results[i] = self.runtime.new_state(1)

    def _sample(self, items) -> None:
        """Greedy choices: one argmax over all rows (per candidate set); sampled ones per row, each with its
        session's generator (exactly ``duplex.sampling.sample`` / ``sample_among``)."""
        greedy = collections.defaultdict(list)
        for job, i, r in items:
            if r.config.is_greedy:
                greedy[r.among].append((job, i, r))
            elif r.among is None:
                job.results[i] = int(sample(r.logits, r.config, r.generator)[0])
            else:
                job.results[i] = int(sample_among(r.logits, r.among, r.config, r.generator)[0])
        for among, group in greedy.items():
            logits = torch.cat([r.logits for _, _, r in group])  # (B, V)
            if among is None:
                chosen = logits.argmax(dim=-1).tolist()
            else:
                ids = torch.as_tensor(among, dtype=torch.long, device=logits.device)  # (C,)
                chosen = ids[logits[:, ids].float().argmax(dim=-1)].tolist()
            for (job, i, _), token in zip(group, chosen):
                job.results[i] = int(token)

    # ------------------------------------------------------------------ model work
    def _run_model_round(self, drive: "_Drive") -> None:
        """One round: every waiting job's model requests, one batched call per kind; then results back."""
        waiting = list(drive.running.items())
        items = [(job, i, r) for _, job in waiting for i, r in enumerate(job.parts)]
        self._encode_all([item for item in items if type(item[2]) is Encode])
        self._prefill_all([item for item in items if type(item[2]) is Prefill])
        self._step_all([item for item in items if type(item[2]) is Step])
        self.rounds += 1
        for owner, job in waiting:
            self._send(drive, owner, job, job.answer())

    def _encode_all(self, items) -> None:
        """One encoder pass per slice length (equal lengths stack without padding: each slice is encoded as
        it would be alone)."""
        by_length = collections.defaultdict(list)
        for item in items:
            by_length[item[2].wav.numel()].append(item)
        encode_batch = getattr(self.encode, "encode_batch", None)
        encode_one = getattr(self.encode, "encode_wav", self.encode)
        for group in by_length.values():
            if encode_batch is not None and len(group) > 1:
                speech = encode_batch(torch.stack([r.wav for _, _, r in group]))  # (B, P, H)
                for row, (job, i, _) in enumerate(group):
                    job.results[i] = speech[row:row + 1]
            else:
                for job, i, r in group:
                    job.results[i] = encode_one(r.wav)

    def _prefill_all(self, items) -> None:
        if not items:
            return
        chunks = self._chunks([r.pieces for _, _, r in items])
        logits, forks = self.runtime.prefill_many([r.state for _, _, r in items], chunks,
                                                  [r.fork_at for _, _, r in items])  # (B, V)
        for row, (job, i, r) in enumerate(items):
            view = logits[row:row + 1]  # (1, V)
            job.results[i] = view if r.fork_at is None else (forks[row], view)

    def _step_all(self, items) -> None:
        if not items:
            return
        ids = torch.tensor([[r.token] for _, _, r in items], dtype=torch.long)  # (B, 1)
        logits = self.runtime.step_many([r.state for _, _, r in items], self.runtime.embed(ids))  # (B, V)
        for row, (job, i, _) in enumerate(items):
            job.results[i] = logits[row:row + 1]

    def _chunks(self, all_pieces: list[tuple]) -> list[torch.Tensor]:
        """Each request's pieces as one (L, H) chunk; the token ids of all requests embedded in one call."""
        ids = [token for pieces in all_pieces for piece in pieces if not isinstance(piece, torch.Tensor)
               for token in piece]
        table = self.runtime.embed(torch.tensor([ids], dtype=torch.long))[0] if ids else None  # (T, H)
        chunks, used = [], 0
        for pieces in all_pieces:
            parts = []
            for piece in pieces:
                if isinstance(piece, torch.Tensor):
                    part = piece.reshape(-1, piece.shape[-1])  # (P, H)
                else:
                    part, used = table[used:used + len(piece)], used + len(piece)
                if part.shape[0]:
                    parts.append(part)
            if not parts:
                raise ValueError("Scheduler: a Prefill request with an empty chunk; skip it instead.")
            dtype = parts[0].dtype if table is None else table.dtype
            chunks.append(torch.cat([p.to(device=parts[0].device, dtype=dtype) for p in parts]))  # (L, H)
        return chunks


_KIND = {**{kind: "cheap" for kind in CHEAP}, **{kind: "model" for kind in COMPUTE}}
