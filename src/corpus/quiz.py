"""Closed-domain facts for spoken QA: Debian `bsdgames` quiz files when installed, else a small built-in table.

The quiz files write alternatives as `a|b`, optional parts as `{x}` and groups as `[a|b]` (also used for accent
markup such as `['e|e'|e]`). `canonical` turns such a pattern into one plain answer.
"""
import pathlib
import re
from dataclasses import dataclass

QUIZ_DIR = pathlib.Path("/usr/share/games/bsdgames/quiz")
_PLAIN = re.compile(r"[A-Za-z .-]*")


@dataclass(frozen=True)
class Fact:
    """One quiz fact: `relation` names the template family (e.g. "capital"), `subject` -> `value`."""
    relation: str
    subject: str
    value: str


def _split_top(pattern: str, sep: str = "|") -> list[str]:
    """Split on `sep` outside {} and [] brackets."""
    parts, depth, current = [], 0, ""
    for char in pattern:
        depth += char in "{["
        depth -= char in "}]"
        if char == sep and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def _group_end(pattern: str, start: int) -> int:
    depth = 0
    for i in range(start, len(pattern)):
        depth += pattern[i] in "{["
        depth -= pattern[i] in "}]"
        if depth == 0:
            return i
    raise ValueError(f"unbalanced brackets in quiz pattern {pattern!r}")


def canonical(pattern: str) -> str:
    """One plain reading of a quiz pattern: first top-level alternative, optional parts included (their longest
    alternative), and in `[...]` groups the first alternative made of plain letters (so accent markup drops out)."""
    return re.sub(r"\s+", " ", _expand(_split_top(pattern)[0])).strip()


def _expand(pattern: str) -> str:
    text, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if char in "{[":
            end = _group_end(pattern, i)
            options = [_expand(o) for o in _split_top(pattern[i + 1:end])]
            if char == "{":
                text += max(options, key=len)
            else:
                text += next((o for o in options if _PLAIN.fullmatch(o)), options[-1])
            i = end + 1
        else:
            text += char
            i += 1
    return text


# (relation, quiz file, key column, value column)
_QUIZ_RELATIONS = (
    ("capital", "africa", 0, 1), ("capital", "america", 0, 1), ("capital", "asia", 0, 1),
    ("capital", "europe", 0, 1), ("capital", "state", 0, 1), ("capital", "province", 0, 1),
    ("state_flower", "state", 0, 3), ("element_symbol", "elements", 3, 0), ("atomic_number", "elements", 3, 1),
    ("baby_animal", "babies", 1, 0), ("collective", "collectives", 0, 1), ("female_form", "sexes", 0, 1),
)

BUILTIN_FACTS = tuple(Fact(*row) for row in (
    ("capital", "France", "Paris"), ("capital", "Germany", "Berlin"), ("capital", "Italy", "Rome"),
    ("capital", "Spain", "Madrid"), ("capital", "Portugal", "Lisbon"), ("capital", "Japan", "Tokyo"),
    ("capital", "China", "Beijing"), ("capital", "India", "New Delhi"), ("capital", "Kenya", "Nairobi"),
    ("capital", "Egypt", "Cairo"), ("capital", "Canada", "Ottawa"), ("capital", "Mexico", "Mexico City"),
    ("capital", "Brazil", "Brasilia"), ("capital", "Argentina", "Buenos Aires"), ("capital", "Peru", "Lima"),
    ("capital", "Australia", "Canberra"), ("capital", "Russia", "Moscow"), ("capital", "Norway", "Oslo"),
    ("capital", "Sweden", "Stockholm"), ("capital", "Finland", "Helsinki"), ("capital", "Greece", "Athens"),
    ("capital", "Poland", "Warsaw"), ("capital", "Austria", "Vienna"), ("capital", "Ireland", "Dublin"),
    ("capital", "Turkey", "Ankara"), ("capital", "Thailand", "Bangkok"), ("capital", "Vietnam", "Hanoi"),
    ("capital", "Nigeria", "Abuja"), ("capital", "Ghana", "Accra"), ("capital", "Chile", "Santiago"),
    ("capital", "Texas", "Austin"), ("capital", "California", "Sacramento"), ("capital", "Ohio", "Columbus"),
    ("element_symbol", "Hydrogen", "H"), ("element_symbol", "Helium", "He"), ("element_symbol", "Oxygen", "O"),
    ("element_symbol", "Carbon", "C"), ("element_symbol", "Iron", "Fe"), ("element_symbol", "Gold", "Au"),
    ("element_symbol", "Silver", "Ag"), ("element_symbol", "Sodium", "Na"), ("element_symbol", "Copper", "Cu"),
    ("atomic_number", "Hydrogen", "1"), ("atomic_number", "Helium", "2"), ("atomic_number", "Carbon", "6"),
    ("atomic_number", "Nitrogen", "7"), ("atomic_number", "Oxygen", "8"), ("atomic_number", "Neon", "10"),
    ("baby_animal", "cat", "kitten"), ("baby_animal", "dog", "puppy"), ("baby_animal", "horse", "foal"),
    ("baby_animal", "cow", "calf"), ("baby_animal", "sheep", "lamb"), ("baby_animal", "goose", "gosling"),
    ("baby_animal", "lion", "cub"), ("baby_animal", "frog", "tadpole"), ("baby_animal", "kangaroo", "joey"),
    ("collective", "ants", "colony"), ("collective", "bees", "swarm"), ("collective", "fish", "school"),
    ("collective", "wolves", "pack"), ("collective", "lions", "pride"), ("collective", "crows", "murder"),
    ("collective", "sheep", "flock"), ("collective", "cattle", "herd"), ("collective", "owls", "parliament"),
    ("female_form", "king", "queen"), ("female_form", "actor", "actress"), ("female_form", "prince", "princess"),
    ("female_form", "waiter", "waitress"), ("female_form", "nephew", "niece"), ("female_form", "uncle", "aunt"),
))


# Quiz lines that make no sense as a spoken question and answer.
_EXCLUDED = {("female_form", "Y"), ("female_form", "effeminate"), ("female_form", "manly"),
             ("female_form", "Oedipus complex"), ("female_form", "dog"), ("female_form", "curator"),
             ("collective", "operating companies")}


def _dedupe(facts):
    seen, unique = set(), []
    for fact in facts:
        key = (fact.relation, fact.subject.lower())
        if key not in seen and (fact.relation, fact.subject) not in _EXCLUDED:
            seen.add(key)
            unique.append(fact)
    return unique


def quiz_dir_under(text_root: pathlib.Path | None) -> pathlib.Path:
    """The quiz folder under a --text-root prefix (where the speedrun unpacks the carried bsdgames .deb) when it is
    there, else the system's: a GPU machine without bsdgames installed asks the same questions as a developer's."""
    if text_root is not None and (text_root / QUIZ_DIR.relative_to("/") / "africa").is_file():
        return text_root / QUIZ_DIR.relative_to("/")
    return QUIZ_DIR


def load_facts(quiz_dir: pathlib.Path | None = None) -> tuple[list[Fact], str]:
    """All facts and their source name: the bsdgames quiz files when `quiz_dir` exists, else the built-in table.

    The first listed fact wins for a repeated (relation, subject), so answers are unambiguous.
    """
    folder = QUIZ_DIR if quiz_dir is None else quiz_dir
    if not (folder / "africa").is_file():
        return list(BUILTIN_FACTS), "built-in fact table"
    facts = []
    for relation, name, key_col, value_col in _QUIZ_RELATIONS:
        path = folder / name
        if path.is_file():
            facts += [Fact(relation, k, v) for k, v in _read_pairs_from(path, key_col, value_col)]
    return _dedupe(facts + list(BUILTIN_FACTS)), f"bsdgames quiz files ({folder}) + built-in table"


def _read_pairs_from(path: pathlib.Path, key_col: int, value_col: int):
    raw = path.read_text(encoding="latin-1").replace("\\\n", "")
    for line in raw.splitlines():
        columns = _split_top(line, ":")
        if len(columns) > max(key_col, value_col):
            key, value = canonical(columns[key_col]), canonical(columns[value_col])
            if key and value and value.lower() not in ("gok", "none"):
                yield key, value
