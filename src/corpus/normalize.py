"""Text normalisation: written text -> the words a TTS engine says -> the ASR transcript.

Numbers, symbols and abbreviations are spelled out *before* synthesis, so the transcript is exactly what was said
(a TTS engine would otherwise read "1789" or "km" in its own way and the label would not match the audio).
`spoken_form` keeps case and punctuation (they steer the engine's prosody); `transcript` is its lower-case,
letters-only version, the ASR label.
"""
import re
import unicodedata

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"), (100, "hundred"))
_ORDINAL_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                      "nine": "ninth", "twelve": "twelfth"}
_SYMBOLS = {"&": " and ", "+": " plus ", "=": " equals ", "%": " percent", "@": " at ", "#": " number ",
            "×": " times ", "÷": " divided by ", "/": " slash ", "°": " degrees "}
_ABBREVIATIONS = {"St.": "Saint", "Dr.": "Doctor", "Mr.": "Mister", "Mrs.": "Missus", "Mt.": "Mount",
                  "etc.": "et cetera", "vs.": "versus", "e.g.": "for example", "i.e.": "that is"}
_NUMBER = re.compile(r"(?<![\w.])(-?)(\d[\d,]*)(?:\.(\d+))?(st|nd|rd|th)?\b")
_CURRENCY = re.compile(r"\$(\d[\d,]*(?:\.\d+)?)")
_ACRONYM = re.compile(r"\b([A-Z]{2,4})\b")


def number_to_words(n: int) -> str:
    """Cardinal English words for an integer, without "and" or hyphens: 1234 -> "one thousand two hundred thirty four"."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    for value, name in _SCALES:
        if n >= value:
            high, rest = divmod(n, value)
            words = number_to_words(high) + " " + name
            return words if rest == 0 else words + " " + number_to_words(rest)
    raise AssertionError("unreachable")


def ordinal_words(n: int) -> str:
    """Ordinal words: 21 -> "twenty first", 40 -> "fortieth"."""
    words = number_to_words(n).split()
    last = words[-1]
    if last in _ORDINAL_IRREGULAR:
        words[-1] = _ORDINAL_IRREGULAR[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def _number_match_to_words(match: re.Match) -> str:
    sign, integer, fraction, suffix = match.groups()
    value = int(integer.replace(",", ""))
    if suffix:
        words = ordinal_words(value)
    else:
        words = number_to_words(value)
        if fraction:
            words += " point " + " ".join(_ONES[int(d)] for d in fraction)
    return ("minus " if sign else "") + words


def _currency_to_words(match: re.Match) -> str:
    amount = match.group(1).replace(",", "")
    dollars, _, cents = amount.partition(".")
    words = number_to_words(int(dollars)) + (" dollar" if int(dollars) == 1 else " dollars")
    if cents and int(cents):
        words += " and " + number_to_words(int(cents[:2].ljust(2, "0"))) + " cents"
    return words


def strip_accents(text: str) -> str:
    """ASCII letters only ("Bogotá" -> "Bogota"): the engines and the transcript alphabet are ASCII."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).encode("ascii", "ignore").decode()


def spoken_form(text: str) -> str:
    """Written text -> the text given to the TTS engine: every number, symbol and abbreviation as words.

    Case and sentence punctuation are kept for prosody. Acronyms of 2-4 capitals are spelled letter by letter.
    """
    text = text.replace("—", ", ").replace("–", " to ")
    for symbol in ("×", "÷", "°"):  # before strip_accents, which would drop them
        text = text.replace(symbol, _SYMBOLS[symbol])
    text = strip_accents(text)
    for short, long in _ABBREVIATIONS.items():
        text = text.replace(short, long)
    text = _CURRENCY.sub(_currency_to_words, text)
    text = _NUMBER.sub(_number_match_to_words, text)
    for symbol, words in _SYMBOLS.items():
        text = text.replace(symbol, words)
    text = _ACRONYM.sub(lambda m: " ".join(m.group(1)), text)
    text = text.replace("_", " ")
    return re.sub(r"\s+", " ", text).strip()


def transcript(text: str) -> str:
    """The ASR label of `text`: its spoken form, lower case, only a-z, apostrophes inside words and single spaces."""
    words = re.sub(r"[^a-z']+", " ", spoken_form(text).lower()).split()
    return " ".join(w.strip("'") for w in words if w.strip("'"))


def is_normalised(label: str) -> bool:
    """True when `label` is a valid transcript: non-empty, lower-case letters, inner apostrophes, single spaces."""
    return bool(re.fullmatch(r"[a-z]+(?:'[a-z]+)*(?: [a-z]+(?:'[a-z]+)*)*", label))
