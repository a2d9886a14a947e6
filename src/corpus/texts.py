"""Text pools of the corpus: QA pairs a small model can learn, ASR sentences, background talk, canned replies.

Every generator takes an explicit `random.Random`, so one seed fixes every text. Answers are full sentences with
numbers spelled out (the LM must say them, and the ASR label of a QA question is its spoken form anyway).
"""
import random
from dataclasses import dataclass

from .normalize import number_to_words
from .quiz import Fact

@dataclass(frozen=True)
class QA:
    """A spoken question and its written full-sentence answer; `topic` names the generator (for the data card);
    `key` is what a right reply must contain (the manifests' `answer` column, scored by src.evaluate)."""
    question: str
    answer: str
    topic: str
    key: str


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


_FACT_TEMPLATES = {  # relation -> (question templates, answer template)
    "capital": (("What is the capital of {s}?", "Which city is the capital of {s}?",
                 "Can you tell me the capital of {s}?", "What's the capital city of {s}?"),
                "The capital of {s} is {v}."),
    "state_flower": (("What is the state flower of {s}?", "Which flower is the state flower of {s}?"),
                     "The state flower of {s} is the {v}."),
    "element_symbol": (("What is the chemical symbol for {s}?", "Which symbol stands for {s}?"),
                       "The chemical symbol for {s} is {v}."),
    "atomic_number": (("What is the atomic number of {s}?", "Which atomic number does {s} have?"),
                      "The atomic number of {s} is {v}."),
    "baby_animal": (("What is a baby {s} called?", "What do you call a young {s}?"),
                    "A baby {s} is called {a} {v}."),
    "collective": (("What is a group of {s} called?", "What do you call a group of {s}?"),
                   "A group of {s} is called {a} {v}."),
    "female_form": (("What is the female form of {s}?", "What is the female equivalent of {s}?"),
                    "The female form of {s} is {v}."),
}


def fact_qa(fact: Fact, rng: random.Random) -> QA:
    questions, answer = _FACT_TEMPLATES[fact.relation]
    subject = fact.subject.lower() if fact.relation in ("element_symbol", "atomic_number") else fact.subject
    value = number_to_words(int(fact.value)) if fact.value.isdigit() else fact.value
    fields = {"s": subject, "v": value, "a": _article(value)}
    return QA(rng.choice(questions).format(**fields), _capitalise(answer.format(**fields)), fact.relation, value)


_OPERATIONS = (  # name, question verb forms, answer word
    ("plus", ("What is {a} plus {b}?", "How much is {a} plus {b}?", "What do you get if you add {a} and {b}?")),
    ("minus", ("What is {a} minus {b}?", "How much is {a} minus {b}?", "What do you get if you take {b} from {a}?")),
    ("times", ("What is {a} times {b}?", "How much is {a} times {b}?", "What is {a} multiplied by {b}?")),
    ("divided by", ("What is {a} divided by {b}?", "How much is {a} divided by {b}?")),
)


def arithmetic_qa(rng: random.Random) -> QA:
    """Small-number arithmetic with exact integer results, all four operations."""
    name, questions = rng.choice(_OPERATIONS)
    if name == "plus":
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        result = a + b
    elif name == "minus":
        a = rng.randint(1, 60)
        b = rng.randint(0, a)
        result = a - b
    elif name == "times":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        result = a * b
    else:
        b, result = rng.randint(2, 12), rng.randint(1, 12)
        a = b * result
    words = {"a": number_to_words(a), "b": number_to_words(b)}
    answer = f"{words['a']} {name} {words['b']} is {number_to_words(result)}."
    return QA(rng.choice(questions).format(**words), _capitalise(answer), "arithmetic", number_to_words(result))


SPELLING_WORDS = tuple("""apple banana orange water house garden school friend music river mountain window
chair table pencil doctor teacher animal yellow purple summer winter spring autumn family letter number city
country island forest ocean planet rocket train bridge market coffee bread butter cheese flower tiger rabbit
monkey turtle eagle dolphin button candle pocket basket camera guitar piano violin yesterday tomorrow morning
evening kitchen bottle mirror carpet pillow blanket jacket shirt shoe sock hat glove cloud storm thunder rain
snow wind light dark happy quick quiet simple strong bright gentle honest clever""".split())


def spelling_qa(rng: random.Random) -> QA:
    word = rng.choice(SPELLING_WORDS)
    question = rng.choice(("How do you spell {w}?", "Can you spell the word {w}?", "How is {w} spelled?"))
    letters = ", ".join(word.upper())
    return QA(question.format(w=word), f"{_capitalise(word)} is spelled {letters}.", "spelling", " ".join(word))


_UNITS = (  # big unit, small unit, how many small in one big
    ("hour", "minute", 60), ("minute", "second", 60), ("day", "hour", 24), ("week", "day", 7),
    ("year", "month", 12), ("meter", "centimeter", 100), ("kilometer", "meter", 1000), ("kilogram", "gram", 1000),
    ("liter", "milliliter", 1000), ("foot", "inch", 12), ("yard", "foot", 3), ("dozen", "egg", 12),
    ("century", "year", 100), ("decade", "year", 10),
)
_PLURALS = {"foot": "feet", "inch": "inches", "century": "centuries", "dozen": "dozen"}


def _plural(unit: str, count: int) -> str:
    return unit if count == 1 else _PLURALS.get(unit, unit + "s")


def units_qa(rng: random.Random) -> QA:
    big, small, factor = rng.choice(_UNITS)
    count = rng.choice((1, 1, 2, 3, 4, 5, 10))
    amount = "one " + big if count == 1 else f"{number_to_words(count)} {_plural(big, count)}"
    smalls = _plural(small, 2)
    question = rng.choice(("How many {s} are in {a}?", "How many {s} are there in {a}?")).format(s=smalls, a=amount)
    total = number_to_words(count * factor)
    answer = f"There are {total} {_plural(small, count * factor)} in {amount}."
    if count * factor == 1:
        answer = f"There is one {small} in {amount}."
    return QA(question, answer, "units", total)


_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_MONTHS = "January February March April May June July August September October November December".split()


def sequence_qa(rng: random.Random) -> QA:
    """What comes after/before a number, a weekday or a month."""
    kind = rng.choice(("number", "number", "day", "month"))
    direction = rng.choice(("after", "before"))
    step = 1 if direction == "after" else -1
    if kind == "number":
        n = rng.randint(1, 99)
        this, other = number_to_words(n), number_to_words(n + step)
        return QA(f"What number comes {direction} {this}?", f"The number {direction} {this} is {other}.", "sequence",
                  other)
    names = _DAYS if kind == "day" else _MONTHS
    i = rng.randrange(len(names))
    this, other = names[i], names[(i + step) % len(names)]
    return QA(f"What {kind} comes {direction} {this}?", f"The {kind} {direction} {this} is {other}.", "sequence", other)


def make_qa(facts: list[Fact], rng: random.Random) -> QA:
    """One QA pair: half quiz facts, half generated (arithmetic, spelling, units, sequences)."""
    if facts and rng.random() < 0.5:
        return fact_qa(rng.choice(facts), rng)
    return rng.choice((arithmetic_qa, spelling_qa, units_qa, sequence_qa))(rng)


_PEOPLE = ("I", "We", "My brother", "My sister", "Our neighbor", "The kids", "Sarah", "Tom", "My mom", "Dad",
           "They", "Emma", "James", "The driver", "My friend")
_DOINGS = ("went to the market", "fixed the old bike", "watched a movie", "cooked dinner", "painted the fence",
           "forgot the keys at home", "walked the dog", "missed the bus", "called the plumber", "baked a cake",
           "cleaned the garage", "planted tomatoes", "finished the report", "lost a glove", "read a long book",
           "went for a run", "visited grandma", "bought new shoes", "washed the car", "fell asleep on the couch",
           "played cards with friends", "took the train to work", "ordered a pizza", "moved the sofa")
_WHENS = ("yesterday", "last night", "this morning", "on Sunday", "after work", "last week", "in the afternoon",
          "before lunch", "again", "")
_REMARKS = ("I think it might rain later.", "That was a really long meeting.", "The coffee here is pretty good.",
            "I can't believe how cold it is today.", "We should leave in about ten minutes.",
            "The traffic was terrible this morning.", "I'll call you back after lunch.", "That movie was so funny.",
            "My phone battery is almost dead.", "The new bakery opened on the corner.", "I need to water the plants.",
            "She said the concert starts at eight.", "Let's take the long way home.", "It's your turn to cook.",
            "The printer is jammed again.", "I left my umbrella in the car.", "He always sings in the shower.",
            "We ran out of milk.", "The game went into overtime.", "I'm going to bed early tonight.")


def background_statement(rng: random.Random) -> str:
    """Speech not addressed to the assistant: a remark or a small story about someone's day (state `ignore`)."""
    if rng.random() < 0.35:
        return rng.choice(_REMARKS)
    when = rng.choice(_WHENS)
    return f"{rng.choice(_PEOPLE)} {rng.choice(_DOINGS)}{' ' + when if when else ''}."


_READ_SENTENCES = (
    "The birch canoe slid gently across the quiet lake.", "A large wave broke over the old stone pier.",
    "The train leaves at 7 and arrives at 9.", "Bright sunlight poured through the open window.",
    "The children built a small fort out of snow.", "Every morning the baker opens his shop at 6.",
    "The museum holds more than 3,000 paintings.", "A gentle breeze carried the smell of fresh bread.",
    "The library closes early on public holidays.", "Our team won the match by 2 goals.",
    "The river flows north for almost 200 miles.", "Heavy rain delayed the start of the race.",
    "She planted 12 rose bushes along the fence.", "The old clock in the hall stopped at noon.",
    "Fresh fruit is sold at the market every Saturday.", "The bridge was built more than 100 years ago.",
    "He wrote a long letter to his grandmother.", "The cat slept on the warm windowsill all afternoon.",
    "Thick fog covered the valley until late morning.", "The recipe needs 2 eggs and a cup of flour.",
)


def asr_sentence(facts: list[Fact], rng: random.Random) -> str:
    """A read-speech sentence: a fact stated as a sentence, a background remark or a built-in sentence."""
    roll = rng.random()
    if roll < 0.4:
        return make_qa(facts, rng).answer
    if roll < 0.7:
        return background_statement(rng)
    return rng.choice(_READ_SENTENCES)
