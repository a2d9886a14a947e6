"""Learning curves from SpeechBrain's `train_log.txt`: python -m src.train_curves LOG [LOG ...] --out curves.png

Why: a speedrun step ends with a budget, not with convergence, and the question after every lease is "was it still
improving?". The log answers it, but as forty lines of numbers; a plot answers it at a glance, and shows where a
resumed step (asr, then asr-more) took over and what each test pass measured.

The log's lines, as `speechbrain.utils.train_logger.FileTrainLogger` writes them:
    epoch: 3, lr: 1.76e-03, steps: 648 - train loss: 68.57 - valid loss: 66.65, valid ACC: 7.26e-01, valid WER_ctc: 94.42
    Epoch loaded: 19 - test loss: 45.03, test ACC: 8.15e-01, test WER_ctc: 48.76
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import sys

SPLITS = ("train", "valid", "test")
_PAIR = re.compile(r"^\s*([^:]+?):\s*(\S+)\s*$")


class TrainLogError(ValueError):
    pass


@dataclasses.dataclass
class Epoch:
    """One logged line: the epoch (or the loaded epoch, for a test pass) and its figures by split."""
    epoch: int
    figures: dict[str, dict[str, float]]  # split ("train", "valid", "test", or "" for lr/steps) -> name -> value


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_line(text: str) -> tuple[int, dict[str, dict[str, float]]] | None:
    """(epoch, figures) of one log line, or None for a line that is not an epoch's or a test pass's."""
    groups = [group.strip() for group in text.strip().split(" - ")]
    head = _PAIR.match(groups[0].split(",")[0]) if groups and groups[0] else None
    if head is None or head.group(1).lower() not in ("epoch", "epoch loaded"):
        return None
    epoch = _number(head.group(2))
    if epoch is None:
        return None
    figures: dict[str, dict[str, float]] = {}
    for group in groups:
        for item in group.split(","):
            pair = _PAIR.match(item)
            if pair is None:
                continue
            name, value = pair.group(1), _number(pair.group(2))
            if value is None or name.lower() in ("epoch", "epoch loaded"):
                continue
            split, _, metric = name.partition(" ")
            if split not in SPLITS or not metric:
                split, metric = "", name
            figures.setdefault(split, {})[metric] = value
    return int(epoch), figures


def read_log(path: pathlib.Path) -> list[Epoch]:
    """Every epoch and test line of a train_log.txt, in file order (a resumed run appends to the same file)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise TrainLogError(f"{path}: no such file. Give a SpeechBrain train_log.txt (in the output folder of a "
                            f"train_*.py run).")
    epochs = []
    for text in path.read_text(errors="replace").splitlines():
        parsed = parse_line(text)
        if parsed is not None:
            epochs.append(Epoch(*parsed))
    if not epochs:
        raise TrainLogError(f"{path}: no 'epoch: N, ...' or 'Epoch loaded: N - test ...' line. Is it a SpeechBrain "
                            f"train_log.txt? (log.txt is the console log, not this one.)")
    return epochs


def series(epochs: list[Epoch], split: str, metric: str) -> tuple[list[int], list[float]]:
    points = [(entry.epoch, entry.figures[split][metric]) for entry in epochs
              if metric in entry.figures.get(split, {})]
    return [x for x, _ in points], [y for _, y in points]


def metrics_of(epochs: list[Epoch]) -> list[str]:
    """The metrics of the valid split (else train), in the log's order: one panel each."""
    for split in ("valid", "train", "test"):
        names: list[str] = []
        for entry in epochs:
            for name in entry.figures.get(split, {}):
                if name not in names:
                    names.append(name)
        if names:
            return names
    return []


def plot(logs: dict[str, list[Epoch]], out: pathlib.Path, metrics: list[str] | None = None) -> pathlib.Path:
    """One panel per metric; per log, train and valid as lines, test passes as labelled markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metrics or metrics_of(next(iter(logs.values())))
    if not metrics:
        raise TrainLogError("no metric to plot: the logs hold no train, valid or test figures.")
    known = {name for epochs in logs.values() for entry in epochs for split, figures in entry.figures.items() if split
             for name in figures}
    unknown = [name for name in metrics if name not in known]
    if unknown:
        raise TrainLogError(f"no such metric in the logs: {', '.join(unknown)}; they hold: {', '.join(sorted(known))}")
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for label, epochs in logs.items():
            prefix = f"{label}: " if len(logs) > 1 else ""
            for split, style in (("train", ":"), ("valid", "-")):
                x, y = series(epochs, split, metric)
                if x:
                    axis.plot(x, y, style, label=f"{prefix}{split}")
            x, y = series(epochs, "test", metric)
            if x:
                axis.plot(x, y, "o", label=f"{prefix}test")
                for epoch, value in zip(x, y):
                    axis.annotate(f"{value:.3g}", (epoch, value), textcoords="offset points", xytext=(0, 6),
                                  ha="center", fontsize=8)
        axis.set_title(metric)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m src.train_curves", description=__doc__.split("\n\n")[0],
        epilog="Example: python -m src.train_curves runs/speedrun/work/asr/train_log.txt --out asr.png --metric loss "
               "WER_ctc. Several logs share the panels, labelled by their folder.")
    parser.add_argument("logs", nargs="+", type=pathlib.Path, help="SpeechBrain train_log.txt files")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="the PNG to write")
    parser.add_argument("--metric", nargs="+", help="the metrics to plot (default: every valid metric)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        logs = {}
        for path in args.logs:
            label = path.parent.name or str(path)
            logs[label if label not in logs else str(path)] = read_log(path)
        written = plot(logs, args.out, args.metric)
    except TrainLogError as error:
        print(f"train_curves: error: {error}", file=sys.stderr)
        return 2
    for label, epochs in logs.items():
        tests = [entry for entry in epochs if "test" in entry.figures]
        last = tests[-1] if tests else epochs[-1]
        summary = ", ".join(f"{split} {name} {value:.4g}" for split, figures in last.figures.items() if split
                            for name, value in figures.items())
        print(f"{label}: {sum('test' not in e.figures for e in epochs)} epochs; last (epoch {last.epoch}): {summary}")
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
