"""Two or more `src.evaluate` reports side by side, against targets:
python -m src.compare_reports embedded=REPORT.json speedrun=REPORT.json --targets hparams/speedrun/targets.yaml

Why: a new model replaces the embedded one only if it is better on the held-out measures (issue #14), and that
decision should come from the reports' numbers, the same way every time, not from reading two Markdown files. The
reports may come from different machines, so results are matched by the end of their names (`corpus/test.csv`),
not by their full paths.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Callable

import yaml


class CompareError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Measure:
    read: Callable[[dict], float | None]  # one result of report.json -> the figure, None where it does not apply
    lower_is_better: bool = False
    percent: bool = False  # shown as "12.3 %" (the report stores WER in percent)
    judged: bool = True  # counted in "better / worse"; latency is shown only: it measures the machine


def _scored(part: dict | None, key: str = "accuracy") -> float | None:
    return part[key] if part and part.get("count") else None


def _min_recall(state: dict | None) -> float | None:
    if not state or not state.get("count"):
        return None
    recalls = [figures["recall"] for figures in state["per_class"].values() if figures.get("support")]
    return min(recalls) if recalls else None


def _wer(result: dict, key: str) -> float | None:
    asr = result.get("asr")
    return asr[key] if asr and asr.get("utterances") else None


MEASURES: dict[str, Measure] = {
    "WER": Measure(lambda result: _wer(result, "WER"), lower_is_better=True, percent=True),
    "CER": Measure(lambda result: _wer(result, "CER"), lower_is_better=True, percent=True),
    "state_accuracy": Measure(lambda result: _scored(result.get("state"))),
    "state_macro_f1": Measure(lambda result: _scored(result.get("state"), "macro_f1")),
    "state_min_recall": Measure(lambda result: _min_recall(result.get("state"))),
    "answers_right": Measure(lambda result: _scored(result.get("answer"))),
    "slices_right": Measure(lambda result: _scored(result.get("slice_state"))),
    "slices_macro_f1": Measure(lambda result: _scored(result.get("slice_state"), "macro_f1")),
    "slices_min_recall": Measure(lambda result: _min_recall(result.get("slice_state"))),
    "latency_median_s": Measure(lambda result: (result.get("latency_s") or {}).get("median")
                                if (result.get("latency_s") or {}).get("count") else None, lower_is_better=True,
                                judged=False),
}


@dataclasses.dataclass(frozen=True)
class Target:
    result: str
    measure: str
    bound: float
    at_most: bool
    what: str

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value <= self.bound if self.at_most else value >= self.bound

    def describe(self) -> str:
        unit = " %" if MEASURES[self.measure].percent else ""
        return f"{'≤' if self.at_most else '≥'} {self.bound:g}{unit}"


def result_key(name: str) -> str:
    """`/any/machine/work/corpus/test.csv` -> `corpus/test.csv`: the part that names the data, not the machine."""
    parts = pathlib.PurePath(name).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else name


def read_report(path: pathlib.Path) -> dict[str, dict]:
    """result key -> result, from a report.json of src.evaluate."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CompareError(f"{path}: no such file. Give the report.json that python -m src.evaluate --out wrote.")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CompareError(f"{path}: not JSON ({error}).") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), dict):
        raise CompareError(f"{path}: no 'results' object; is it src.evaluate's report.json (not report.md)?")
    results: dict[str, dict] = {}
    for name, result in report["results"].items():
        key = result_key(name)
        if key in results:
            raise CompareError(f"{path}: two results end in {key!r}; rename one of the manifests or script folders.")
        results[key] = result
    return results


def read_reports(paths: list[pathlib.Path]) -> dict[str, dict]:
    """The results of several reports of one model as one (e.g. the corpus splits, and real speech run apart)."""
    merged: dict[str, dict] = {}
    for path in paths:
        for key, result in read_report(path).items():
            if key in merged:
                raise CompareError(f"{path}: a result ending in {key!r} is also in an earlier report of the same "
                                   "label; give each result once.")
            merged[key] = result
    return merged


def read_targets(path: pathlib.Path) -> list[Target]:
    document = yaml.safe_load(pathlib.Path(path).read_text()) or {}
    targets = []
    for number, entry in enumerate(document.get("targets") or [], start=1):
        where = f"{path}: target {number}"
        if entry.get("measure") not in MEASURES:
            raise CompareError(f"{where}: measure {entry.get('measure')!r} is not one of {', '.join(MEASURES)}.")
        if ("at_most" in entry) == ("at_least" in entry):
            raise CompareError(f"{where}: give exactly one of at_most and at_least.")
        if not entry.get("result"):
            raise CompareError(f"{where}: no 'result' (the end of a manifest's or script folder's name).")
        at_most = "at_most" in entry
        targets.append(Target(result=result_key(entry["result"]), measure=entry["measure"],
                              bound=float(entry["at_most" if at_most else "at_least"]), at_most=at_most,
                              what=entry.get("what", f"{entry['measure']}, {entry['result']}")))
    return targets


def figure(results: dict[str, dict], key: str, measure: str) -> float | None:
    return MEASURES[measure].read(results[key]) if key in results else None


def show(value: float | None, measure: str) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} %" if MEASURES[measure].percent else f"{value:.3f}"


def rows(reports: dict[str, dict[str, dict]]) -> list[tuple[str, str]]:
    """(result key, measure) for every measure that any report has, results in the first report's order."""
    keys: list[str] = []
    for results in reports.values():
        keys += [key for key in results if key not in keys]
    return [(key, measure) for key in keys for measure in MEASURES
            if any(figure(results, key, measure) is not None for results in reports.values())]


def better(first: float, second: float, measure: str) -> int:
    """+1 where `second` is better than `first`, -1 where worse, 0 where equal."""
    if first == second:
        return 0
    return 1 if (second < first) == MEASURES[measure].lower_is_better else -1


def compare(reports: dict[str, dict[str, dict]], targets: list[Target]) -> str:
    """The Markdown: every shared measure, the targets met, and the last report against the first."""
    labels = list(reports)
    lines = ["| result | measure | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for key, measure in rows(reports):
        lines.append(f"| {key} | {measure} | "
                     + " | ".join(show(figure(reports[label], key, measure), measure) for label in labels) + " |")
    if targets:
        lines += ["", "| target | result | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
        for target in targets:
            cells = []
            for label in labels:
                value = figure(reports[label], target.result, target.measure)
                met = target.met(value)
                cells.append(show(value, target.measure) + ("" if met is None else (" ✓" if met else " ✗")))
            lines.append(f"| {target.what} ({target.describe()}) | {target.result} | " + " | ".join(cells) + " |")
        lines.append("")
        for label in labels:
            met = sum(bool(target.met(figure(reports[label], target.result, target.measure))) for target in targets)
            lines.append(f"- {label}: {met} of {len(targets)} targets met")
    if len(labels) >= 2:
        first, last = labels[0], labels[-1]
        wins, losses, ties = [], [], []
        for key, measure in rows(reports):
            a, b = figure(reports[first], key, measure), figure(reports[last], key, measure)
            if a is None or b is None or not MEASURES[measure].judged:
                continue
            {1: wins, -1: losses, 0: ties}[better(a, b, measure)].append(f"{key} {measure}")
        lines += ["", f"**{last} against {first}:** better on {len(wins)}, worse on {len(losses)}, equal on "
                  f"{len(ties)} of {len(wins) + len(losses) + len(ties)} shared measures (latency left out)."]
        if losses:
            lines.append(f"Worse on: {', '.join(losses)}.")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m src.compare_reports", description=__doc__.split("\n\n")[0],
        epilog="LABEL=PATH names a report; a bare PATH is labelled by its folder. The last report is compared with "
               "the first: give the baseline first.")
    parser.add_argument("reports", nargs="+",
                        help="LABEL=report.json[,report.json ...] or report.json (baseline first); several reports "
                             "of one label are merged")
    parser.add_argument("--targets", type=pathlib.Path, help="e.g. hparams/speedrun/targets.yaml")
    parser.add_argument("--out", type=pathlib.Path, help="also write the Markdown here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        reports: dict[str, dict[str, dict]] = {}
        for spec in args.reports:
            label, _, path = spec.partition("=") if "=" in spec else ("", "", spec)  # a path may hold "="
            label = label or pathlib.Path(path).parent.name or path
            if label in reports:
                raise CompareError(f"two reports are labelled {label!r}; name them: LABEL=PATH.")
            reports[label] = read_reports([pathlib.Path(part) for part in path.split(",")])
        targets = read_targets(args.targets) if args.targets else []
    except (CompareError, OSError, yaml.YAMLError) as error:
        print(f"compare_reports: error: {error}", file=sys.stderr)
        return 2
    text = compare(reports, targets)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
