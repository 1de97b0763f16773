"""A small task set whose answers can be checked exactly: arithmetic, copying, lookup from a
given passage and simple facts. Lossy methods (early exit, mixture-of-depths, cascades, typical
acceptance) report their accuracy on it beside their cost.

An answer counts when it appears as a whole word on the first non-empty line of the output, so
"The capital of France is Paris." is right for "Paris" and "142" is wrong for "42".
"""

from __future__ import annotations

import dataclasses
import re

ANSWER_HINT = "Answer in a few words."


@dataclasses.dataclass(frozen=True)
class Task:
    kind: str  # "arithmetic", "copy", "lookup" or "fact"
    prompt: str  # the user message
    answer: str  # what must appear on the first line of the output


_ARITHMETIC = [(7, "+", 5), (12, "+", 9), (23, "+", 14), (40, "+", 17), (9, "-", 4),
               (30, "-", 12), (56, "-", 21), (6, "*", 7), (8, "*", 3), (11, "*", 4),
               (15, "+", 15), (100, "-", 1)]
_COPY = ["blue elephant", "seven silver spoons", "apple banana cherry", "quantum tomato 42",
         "the quiet river", "north star 17", "red, green, blue", "hello world",
         "zebra crossing", "paper boat 9", "winter morning light", "one two three four"]
_LOOKUP = [
    ("The first public library in the town opened in 1887 with two hundred books donated by "
     "a local merchant.", "In which year did the library open?", "1887"),
    ("The first public library in the town opened in 1887 with two hundred books donated by "
     "a local merchant.", "Who donated the books?", "merchant"),
    ("Mara keeps three cats named Pepper, Olive and Biscuit in her flat in Lisbon.",
     "In which city is Mara's flat?", "Lisbon"),
    ("Mara keeps three cats named Pepper, Olive and Biscuit in her flat in Lisbon.",
     "How many cats does Mara keep?", "three|3"),
    ("The train to Oslo leaves from platform 6 at a quarter past nine.",
     "From which platform does the train leave?", "6"),
    ("The train to Oslo leaves from platform 6 at a quarter past nine.",
     "Where does the train go?", "Oslo"),
    ("Honeybees tell each other where flowers are with a waggle dance.",
     "What do honeybees use to tell each other where flowers are?", "dance"),
    ("The Rhine rises in the Swiss Alps and flows into the North Sea.",
     "Where does the Rhine rise?", "Alps"),
    ("The Rhine rises in the Swiss Alps and flows into the North Sea.",
     "Into which sea does the Rhine flow?", "North Sea"),
    ("Tom bought a green bicycle for his sister Anna on her tenth birthday.",
     "What colour was the bicycle?", "green"),
    ("Tom bought a green bicycle for his sister Anna on her tenth birthday.",
     "What is the name of Tom's sister?", "Anna"),
    ("The bakery on Elm Street sells rye bread on Mondays and croissants on Fridays.",
     "On which day are croissants sold?", "Friday"),
]
_FACTS = [("What is the capital of France?", "Paris"),
          ("What is the capital of Japan?", "Tokyo"),
          ("What is the capital of Italy?", "Rome"),
          ("How many days are in a week?", "seven|7"),
          ("What color is the sky on a clear day?", "blue"),
          ("What is the largest planet in our solar system?", "Jupiter"),
          ("What do bees make?", "honey"),
          ("What is frozen water called?", "ice"),
          ("How many legs does a spider have?", "eight|8"),
          ("Which animal is known as the king of the jungle?", "lion"),
          ("What is the opposite of hot?", "cold"),
          ("Which planet do we live on?", "Earth")]


def _compute(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def tasks() -> list[Task]:
    """48 tasks, 12 of each kind, in a fixed order (kinds grouped)."""
    out = [Task("arithmetic", f"What is {a} {op} {b}? {ANSWER_HINT}", str(_compute(a, op, b)))
           for a, op, b in _ARITHMETIC]
    out += [Task("copy", f"Repeat exactly this text and nothing else: {text}", text)
            for text in _COPY]
    out += [Task("lookup", f"{passage}\n\nQuestion: {q} {ANSWER_HINT}", answer)
            for passage, q, answer in _LOOKUP]
    out += [Task("fact", f"{q} {ANSWER_HINT}", answer) for q, answer in _FACTS]
    return out


def first_line(output: str) -> str:
    return next((line for line in output.splitlines() if line.strip()), "")


def is_correct(answer: str, output: str) -> bool:
    """Whether any "|"-separated form of `answer` is a whole word (case-insensitive) on the
    first non-empty line of `output`."""
    line = first_line(output).lower()
    return any(re.search(rf"(?<![0-9a-z]){re.escape(form.strip().lower())}(?![0-9a-z])", line)
               for form in answer.split("|"))
