"""Measure a trained model's state decisions and greedy replies (the numbers of example/model/README.md).

The state token is the argmax among the three state tokens after "<|endofspeech|>" (CustomGenerator's pass 1,
greedy), the reply the greedy continuation after it (pass 2). Deterministic: no sampling anywhere.

    python scripts/eval_demo_model.py duplex/duplex_demo.yaml --manifest data/demo/demo-qa-state-test.csv
    python scripts/eval_demo_model.py duplex/duplex_demo.yaml --wavs example/*.wav
    python scripts/eval_demo_model.py duplex/duplex_demo.yaml --checkpoint results/demo/demo_stage3/3407/save ...
"""
from __future__ import annotations

import argparse
import csv
import pathlib
import sys
from collections import Counter

import torch
from tqdm import tqdm

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from CustomGenerator import CustomGenerator, GenerationOptions  # noqa: E402
from duplex.sampling import SamplingConfig  # noqa: E402
from modules.model import load_inference_network  # noqa: E402
from modules.tokenizer import load_tokenizer  # noqa: E402
from src import prompts  # noqa: E402
from src.audio import load_audio  # noqa: E402

STATE_OF_MANIFEST = {"respond": prompts.RESPONSE, "empty": prompts.RESPONSE, "incomplete": prompts.INCOMPLETE,
                     "ignore": prompts.IGNORE}
STATE_OF_FILE_PREFIX = {"question": prompts.RESPONSE, "interrupt": prompts.RESPONSE,
                        "incomplete": prompts.INCOMPLETE, "ignore": prompts.IGNORE}


def greedy_generator(yaml_path, checkpoint=None, max_new_tokens=32) -> CustomGenerator:
    """CustomGenerator on the YAML's network with argmax in both passes."""
    hparams = load_inference_network(yaml_path, checkpoint=checkpoint, device="cpu", precision="fp32")
    greedy = SamplingConfig(greedy=True)
    options = GenerationOptions(state=greedy, reply=greedy, max_new_tokens=max_new_tokens)
    return CustomGenerator(hparams["net"], load_tokenizer(num_state_tokens=3), options)


def expected_state_of_file(path: pathlib.Path) -> str:
    """example/ naming: question_* / interrupt_* -> <|endofuser|>, incomplete_* and ignore_* their tokens."""
    prefix = path.stem.split("_")[0]
    if prefix not in STATE_OF_FILE_PREFIX:
        raise ValueError(f"{path}: cannot tell the expected state from the name; name it one of "
                         f"{sorted(STATE_OF_FILE_PREFIX)}_<anything>.wav")
    return STATE_OF_FILE_PREFIX[prefix]


def manifest_items(csv_path: pathlib.Path) -> list[tuple[pathlib.Path, str, str]]:
    """(audio path, expected state token, reference reply) for each row of a corpus manifest."""
    with open(csv_path, newline="") as stream:
        return [(csv_path.parent / row["wav"], STATE_OF_MANIFEST[row["state"]], row["response"])
                for row in csv.DictReader(stream)]


def file_items(paths) -> list[tuple[pathlib.Path, str, str]]:
    return [(pathlib.Path(p), expected_state_of_file(pathlib.Path(p)), "") for p in paths]


@torch.no_grad()
def evaluate(generator: CustomGenerator, items, replies_per_state: int = 0, show_progress: bool = True):
    """Predicted state per item (list of (expected, predicted)) and up to `replies_per_state` greedy replies
    per expected state (list of (audio, expected, predicted, reply, reference))."""
    decisions, samples = [], []
    shown = Counter()
    for path, expected, reference in tqdm(items, desc="utterances", disable=not show_progress):
        wav = load_audio(path)
        if shown[expected] < replies_per_state:
            result = generator.generate(wav)
            predicted = result.state_token
            samples.append((path, expected, predicted, result.reply.strip(), reference))
            shown[expected] += 1
        else:
            predicted = generator.state_token(wav)
        decisions.append((expected, predicted))
    return decisions, samples


def accuracy_table(decisions) -> dict[str, tuple[int, int]]:
    """state -> (correct, total), plus 'all'."""
    table = {}
    for state in prompts.STATE_TOKENS:
        rows = [p for e, p in decisions if e == state]
        table[state] = (sum(p == state for p in rows), len(rows))
    table["all"] = (sum(e == p for e, p in decisions), len(decisions))
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("yaml", help="inference YAML, e.g. duplex/duplex_demo.yaml")
    parser.add_argument("--checkpoint", help="save folder or CKPT folder; default: the YAML's checkpoint")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=pathlib.Path, help="corpus manifest CSV (state column = expected)")
    source.add_argument("--wavs", nargs="+", help="audio files named question_*, incomplete_*, ignore_*, ...")
    parser.add_argument("--replies", type=int, default=3, help="greedy replies shown per expected state")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    args = parser.parse_args(argv)
    items = manifest_items(args.manifest) if args.manifest else file_items(args.wavs)
    generator = greedy_generator(args.yaml, args.checkpoint, args.max_new_tokens)
    decisions, samples = evaluate(generator, items, args.replies)
    for state, (correct, total) in accuracy_table(decisions).items():
        if total:
            print(f"state accuracy {state:<15} {correct}/{total} = {correct / total:.3f}")
    print("confusion (expected -> predicted):", dict(Counter(decisions)))
    for path, expected, predicted, reply, reference in samples:
        print(f"\n{path.name}: expected {expected}, predicted {predicted}\n  reply:     {reply}"
              + (f"\n  reference: {reference}" if reference else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
