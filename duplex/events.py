"""What a duplex session reports: one ``Event`` per time slice, and the conversation transcript.

Events are plain data (JSON-ready) so a CLI, a server and a benchmark can all consume them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Role changes an event can carry, in the order they happen within a slice.
LISTEN_START = "listen_start"  # the user started a new turn: a listening branch was forked
IGNORED = "ignored"  # the listener predicted <|ignore|> and was dropped
RESET = "reset"  # an ignored input had no conversation before it: back to the empty start
INTERRUPT = "interrupt"  # a new reply took over while the previous one was still being generated
REPLY_START = "reply_start"  # the listener became the speaker (state token respond, or forced)
FORCED_REPLY = "forced_reply"  # the reply was forced (silence after speech, or the final round)
REPLY_END = "reply_end"  # the speaker produced EOS
REPLY_TRUNCATED = "reply_truncated"  # the speaker hit max_branch_tokens


@dataclass
class Event:
    """What happened in one slice (or one final-round generation chunk)."""

    slice_index: int
    start_s: float  # time of the slice start since the session began
    duration_s: float
    input: str  # "speech" | "silence" | "final"
    label: str | None = None  # where the input came from (audio file name), for display
    speech_positions: int | None = None  # LM positions the speech slice produced (None for silence)
    state_token: str | None = None  # token predicted by the listener's probe, None when not probed
    state_token_id: int | None = None
    text: str = ""  # reply text emitted during this slice
    changes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Turn:
    """One turn of the conversation transcript."""

    role: str  # "user" | "assistant"
    start_s: float
    text: str = ""  # user: input labels; assistant: the reply text
    status: str = "open"  # user: open/answered/ignored; assistant: speaking/complete/interrupted/truncated

    def render(self) -> str:
        who = "User" if self.role == "user" else "Assistant"
        lines = [line.strip() for line in self.text.splitlines() if line.strip()]
        text = ("\n" + " " * 12).join(lines)  # blank lines dropped, continuation lines indented
        return f"[{self.start_s:7.2f}s] {who} ({self.status}): {text}"
