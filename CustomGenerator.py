"""Offline two-pass DuplexMamba inference on one audio file.

    python CustomGenerator.py duplex/duplex_tiny.yaml --wav_path example/question_capital.wav
    python CustomGenerator.py duplex/duplex.yaml --wav_path question.flac --checkpoint SAVE_DIR --precision bf16

Pass 1 encodes the whole file and predicts the state token after "<|endofspeech|>" (one of <|endofuser|>,
<|incomplete|>, <|ignore|>); pass 2 continues from that very recurrent state with the state token and
"\\n<|assistant|>\\n" and samples the reply until EOS. Prints `state token: ...` then the reply.

Fixed relative to the reference script (spec §5, §8.3-8.4): modules in eval mode (no dropout, normaliser
statistics loaded with the checkpoint and frozen), `--precision bf16` really puts the LM in bfloat16, any sample
rate / channel count is resampled to 16 kHz mono, the checkpoint folder is configurable, the state token is
chosen among the three state tokens (the reference sampled the whole vocabulary), and pass 2 reuses pass 1's
state instead of re-reading the prompt.

The two passes are one job of model work requests (``duplex/work.py``) run by the duplex engine's scheduler
(``duplex/scheduler.py``), the same code that runs every duplex conversation.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

import torch

from duplex.engine import make_runtime
from duplex.sampling import SamplingConfig
from duplex.scheduler import Scheduler
from duplex.work import Encode, NewState, Prefill, Release, Sample, Step
from modules.model import PRECISIONS, load_inference_network
from modules.tokenizer import EOS_ID, check_added_tokens, load_tokenizer
from src import prompts
from src.audio import load_audio

log = logging.getLogger("CustomGenerator")


@dataclass(frozen=True)
class GenerationOptions:
    state: SamplingConfig  # pass 1, restricted to the three state tokens
    reply: SamplingConfig  # pass 2
    max_new_tokens: int  # reply length cap (EOS usually comes first)

    KEYS = ("state_temperature", "state_top_p", "state_top_k", "reply_temperature", "reply_top_p", "reply_top_k",
            "max_new_tokens")

    @classmethod
    def from_yaml(cls, block: dict, source: str = "inference YAML") -> "GenerationOptions":
        """The YAML's `generator:` block; a missing, misspelt or extra key is an error naming the file."""
        if not isinstance(block, dict):
            raise ValueError(f"{source}: needs a `generator:` block with keys {', '.join(cls.KEYS)} "
                             "(see duplex/duplex_tiny.yaml).")
        missing, unknown = sorted(set(cls.KEYS) - set(block)), sorted(set(block) - set(cls.KEYS))
        if missing or unknown:
            raise ValueError(f"{source}: generator block: missing {missing}, unknown {unknown}; "
                             f"expected exactly {', '.join(cls.KEYS)}.")
        try:
            return cls(
                state=SamplingConfig(block["state_temperature"], block["state_top_p"], block["state_top_k"]),
                reply=SamplingConfig(block["reply_temperature"], block["reply_top_p"], block["reply_top_k"]),
                max_new_tokens=int(block["max_new_tokens"]),
            )
        except (TypeError, ValueError) as error:  # e.g. a quoted number, top_p 1.5
            raise ValueError(f"{source}: generator block: {error}") from error


@dataclass
class GenerationResult:
    state_token: str
    reply: str
    reply_ids: list[int]


class CustomGenerator:
    """Owns the network, tokenizer and sampling options; `generate(wav)` runs both passes on one waveform."""

    def __init__(self, net: dict, tokenizer, options: GenerationOptions, seed: int = 0, num_state_tokens: int = 3,
                 state_rows: int = 1):
        """``num_state_tokens`` 1 (a stage-1/2 network) allows ``transcribe`` only; 3 allows both passes.
        ``state_rows``: the GPU state pool's size (1 for one file at a time; more when sessions share it)."""
        self.speech_encoder = net["speech_encoder"]
        self.lm = net["model"].lm
        # CUDA: the GPU backend (one pool row, decode from CUDA graphs); elsewhere the pure-torch reference
        self.runtime = make_runtime(self.lm.model, self.lm.model.lm_head.weight.device, state_rows=state_rows)
        self.tokenizer = tokenizer
        self.options = options
        self.has_states = num_state_tokens == 3
        check_added_tokens(tokenizer, num_state_tokens, source="CustomGenerator tokenizer")
        if self.has_states and self.lm.config.vocab_size < len(tokenizer):
            raise ValueError(f"the LM has {self.lm.config.vocab_size} vocabulary rows, fewer than the tokenizer's "
                             f"{len(tokenizer)}: a stage-1/2 model has no state tokens; use a stage-3/4 checkpoint "
                             f"with num_state_tokens: 3")
        self.prompt_ids = self._ids(prompts.INFERENCE_PROMPT)
        self.suffix_ids = self._ids(prompts.END_OF_SPEECH)
        self.assistant_ids = self._ids(prompts.ASSISTANT_PROMPT)
        self.state_ids = [prompts.STATE_TOKEN_IDS[t] for t in prompts.STATE_TOKENS]
        self.generator = torch.Generator(device=self.runtime.device).manual_seed(seed)
        self.scheduler = Scheduler(self.runtime, self._encode)

    def generate(self, wav: torch.Tensor) -> GenerationResult:
        """wav (N,) float32 16 kHz mono -> state token and reply."""
        return self.generate_many([wav])[0]

    def generate_many(self, wavs: list[torch.Tensor]) -> list[GenerationResult]:
        """`generate` for several waveforms at once: their jobs run together on the scheduler (one batched prefill
        and decode step per round). Greedy results equal one-at-a-time calls; sampled ones draw from the shared
        generator in another order. The GPU pool needs a row per waveform (``state_rows``)."""
        self._require_states()
        return self.scheduler.run([self._two_passes(wav) for wav in wavs])

    def state_token(self, wav: torch.Tensor) -> str:
        """Pass 1 alone: the state token of wav (N,) (evaluation of the state decision)."""
        self._require_states()
        return self.scheduler.run([self._two_passes(wav, reply=False)])[0].state_token

    def _require_states(self) -> None:
        if not self.has_states:
            raise ValueError("this network has no state tokens (a stage-1/2 checkpoint): only transcribe() works; "
                             "use a stage-3/4 checkpoint with num_state_tokens: 3 for the state token and reply.")

    def transcribe(self, wav: torch.Tensor, instruction: str) -> str:
        """The stage-1/2 task: the reply to ``instruction`` about wav (N,) under the training prompt (an ASR
        instruction gives the transcript). Works on every stage's network."""
        return self.transcribe_many([wav], instruction)[0]

    def transcribe_many(self, wavs: list[torch.Tensor], instruction: str) -> list[str]:
        """`transcribe` for several waveforms at once, batched as `generate_many`."""
        return self.scheduler.run([self._instructed(wav, instruction) for wav in wavs])

    def _instructed(self, wav: torch.Tensor, instruction: str):
        """The job: user_prompt(instruction) | speech | "<|endofspeech|><|endofuser|>\\n<|assistant|>\\n", then
        the reply until EOS (the layout stages 1-2 train on, src.sequence)."""
        speech = yield Encode(wav)  # (1, P, H)
        state = yield NewState()
        prefix, suffix = self._ids(prompts.user_prompt(instruction)), self._ids(prompts.STAGE12_SUFFIX)
        logits = yield Prefill(state, (tuple(prefix), speech, tuple(suffix)))  # (1, V)
        reply = yield from self._reply(state, logits)
        yield Release(state)
        return self.tokenizer.decode(reply, skip_special_tokens=True)

    def _two_passes(self, wav: torch.Tensor, reply: bool = True):
        """The job: pass 1 = prompt | speech | "<|endofspeech|>" into a fresh state and the state token; pass 2 =
        state token + "\\n<|assistant|>\\n" on top of that state, then sample the reply until EOS."""
        speech = yield Encode(wav)  # (1, P, H)
        state = yield NewState()
        logits = yield Prefill(state, (tuple(self.prompt_ids), speech, tuple(self.suffix_ids)))  # (1, V)
        state_id = yield Sample(logits, self.options.state, self.generator, among=tuple(self.state_ids))
        if not reply:
            yield Release(state)
            return GenerationResult(self.tokenizer.convert_ids_to_tokens(state_id), "", [])
        logits = yield Prefill(state, ((state_id, *self.assistant_ids),))  # (1, V)
        reply = yield from self._reply(state, logits)
        yield Release(state)  # the GPU backend's pool row is free for the next file
        return GenerationResult(self.tokenizer.convert_ids_to_tokens(state_id), self.tokenizer.decode(reply), reply)

    def _reply(self, state, logits):
        """Sample reply tokens from ``logits`` (1, V) on, feeding each to ``state``, until EOS or the cap."""
        reply = []
        for _ in range(self.options.max_new_tokens):
            token = yield Sample(logits, self.options.reply, self.generator)
            if token == EOS_ID:
                break
            reply.append(token)
            logits = yield Step(state, token)  # (1, V)
        return reply

    def _encode(self, wav: torch.Tensor) -> torch.Tensor:
        """wav (N,) -> speech embeddings (1, P, H) (the encoder's batch forward, one row of full length)."""
        device = self.runtime.device
        speech, _ = self.speech_encoder(wav.to(device)[None], torch.ones(1, device=device))  # (1, P, H)
        return speech

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("yaml", help="inference YAML, e.g. duplex/duplex.yaml or duplex/duplex_tiny.yaml")
    parser.add_argument("--wav_path", required=True, help="audio file (any rate / channels; resampled to 16 kHz)")
    parser.add_argument("--checkpoint", help="save folder (CKPT+* averaged) or one CKPT folder; default: YAML")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), help="default: the YAML's precision")
    parser.add_argument("--seed", type=int, help="sampling seed; default: the YAML's seed")
    parser.add_argument("--device", help="cpu or cuda[:N]; default: the YAML's device")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        wav = load_audio(args.wav_path)
        hparams = _load(args)
        tokenizer = load_tokenizer(num_state_tokens=3)
        options = GenerationOptions.from_yaml(hparams.get("generator"), source=args.yaml)
        seed = args.seed if args.seed is not None else hparams.get("seed", 0)
        generator = CustomGenerator(hparams["net"], tokenizer, options, seed=seed)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = generator.generate(wav)
    print(f"state token: {result.state_token}")
    print(result.reply)
    return 0


def _load(args) -> dict:
    """The YAML's device / precision / checkpoint unless the command line says otherwise."""
    return load_inference_network(args.yaml, checkpoint=args.checkpoint, device=args.device,
                                  precision=args.precision)


if __name__ == "__main__":
    sys.exit(main())
