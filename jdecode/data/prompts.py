"""Prompt sets of three kinds (chat, code, summarization of a given passage): a training set for
the distilled draft and a disjoint evaluation set for the speculative benchmark."""

from __future__ import annotations

PASSAGES = [
    ("The Rhine rises in the Swiss Alps, forms part of the border between Switzerland and "
    "Germany, and flows north through Germany and the Netherlands into the North Sea. For "
    "centuries it has been one of Europe's busiest waterways, carrying coal, grain and "
    "containers between the industrial Ruhr and the port of Rotterdam."),
    ("Photosynthesis converts light energy into chemical energy. In the chloroplasts of plant "
    "cells, chlorophyll absorbs sunlight, water molecules are split, and oxygen is released. "
    "The energy captured is then used to turn carbon dioxide into sugars that feed the plant."),
    ("The first public library in the town opened in 1887 with two hundred books donated by a "
    "local merchant. Today it holds more than eighty thousand volumes, runs reading clubs for "
    "children, and lends laptops to students who do not have one at home."),
    ("Honeybees communicate the location of food with a waggle dance. The angle of the dance "
    "relative to vertical shows the direction of the flowers relative to the sun, and the "
    "length of the waggle run tells the other bees how far away they are."),
    ("A hash table stores key-value pairs in an array. A hash function maps each key to an "
    "index; when two keys map to the same index, the collision is resolved by chaining or by "
    "probing for the next free slot. Lookups take constant time on average."),
    ("The Great Barrier Reef stretches for more than two thousand kilometres along the coast of "
    "Queensland. It is built by billions of tiny coral polyps and is home to thousands of "
    "species of fish, molluscs and sea turtles, but warming seas have caused mass bleaching."),
]

_TRAIN_PASSAGES = [
    ("The violin has four strings tuned in fifths. Its sound comes from the bow drawn across the "
    "strings, which makes them vibrate; the bridge passes the vibration to the wooden body, "
    "and the hollow body amplifies it."),
    ("Tides are caused mainly by the gravity of the moon. The side of the earth facing the moon "
    "is pulled most strongly, the far side least, and the oceans bulge on both sides, so most "
    "coasts see two high tides a day."),
    ("The printing press spread across Europe within fifty years of its invention in Mainz. "
    "Books became cheaper, more people learned to read, and new ideas travelled faster than "
    "ever before, from scientific discoveries to religious pamphlets."),
    ("A vaccine trains the immune system with a harmless piece or copy of a germ. When the real "
    "germ arrives later, memory cells recognise it and the body responds quickly, often "
    "before the person feels ill at all."),
    ("Sourdough bread rises because of wild yeast and lactic acid bacteria living in a starter. "
    "The bacteria give the bread its sour taste, and the long fermentation makes the crust "
    "darker and the crumb more open than in bread made with baker's yeast."),
    ("Binary search finds an item in a sorted list by comparing it with the middle element and "
    "discarding the half that cannot contain it. Each comparison halves the range, so a "
    "million items need only about twenty comparisons."),
]
_TRAIN_TOPICS = ["the ocean", "volcanoes", "friendship", "the moon", "bicycles", "coffee",
                 "rainforests", "electricity", "chess", "music", "winter", "robots", "bread",
                 "the internet", "dinosaurs", "gardening", "photography", "the desert",
                 "airports", "mathematics", "libraries", "running", "the weather", "trains",
                 "space travel", "recycling", "birds", "cooking pasta", "history", "saving money",
                 "mountains", "computers", "painting", "honey", "earthquakes", "the human heart"]
_TRAIN_CHAT = ["Explain {} to a ten-year-old.", "Write a short poem about {}.",
               "What are three interesting facts about {}?", "Give me some advice about {}.",
               "Write a short story that involves {}.", "What are the pros and cons of {}?",
               "Describe {} in a few sentences.", "Why do people care about {}?"]
_TRAIN_CODE = ["reverses a string", "checks whether a number is prime", "sums a list of numbers",
               "counts the vowels in a word", "returns the largest element of a list",
               "converts Celsius to Fahrenheit", "merges two sorted lists",
               "computes the factorial of n", "finds the second largest number in a list",
               "checks whether two words are anagrams", "counts how often each letter occurs",
               "returns the even numbers of a list", "joins a list of words with commas",
               "computes the greatest common divisor of two numbers",
               "reads a CSV file and prints the first column", "validates an email address"]

_EVAL_CHAT = ["What is the capital of France, and why is it famous?",
              "How do airplanes stay in the air?", "Write a haiku about autumn leaves.",
              "What is the difference between weather and climate?",
              "Give me three tips for learning a new language.",
              "Why is the sky blue?", "Describe a good breakfast.",
              "What does a software engineer do?", "How can I sleep better?",
              "Tell me a short story about a brave cat.", "What is a black hole?",
              "List five fruits that are rich in vitamin C.",
              "How does a refrigerator keep food cold?", "What is the water cycle?",
              "Explain what a computer virus is.", "Why do we have seasons?",
              "What makes a good friend?", "How do vaccines work?"]
_EVAL_CODE = ["Write a Python function that returns the n-th Fibonacci number.",
              "Write a Python function that checks whether a string is a palindrome.",
              "Write a Python class for a stack with push and pop methods.",
              "Write a Python function that removes duplicates from a list.",
              "Write a Python function that counts words in a sentence.",
              "Write a Python function that sorts a list with bubble sort.",
              "Write a JavaScript function that adds two numbers.",
              "Write a Python function that reads a file and prints each line.",
              "Write a Python function that finds the minimum of a list.",
              "Write a Python function that returns the square of every number in a list.",
              "Write a Python function that flattens a nested list.",
              "Write a Python function that computes the average of a list.",
              "Write a Python function that capitalizes every word in a string.",
              "Write a SQL query that selects all users older than 30.",
              "Write a Python function that checks whether a year is a leap year.",
              "Write a Python function that converts a list of strings to upper case."]


def _summarize(passage: str, style: str) -> str:
    return f"{style}\n\n{passage}"


def train_prompts() -> list[str]:
    """332 user messages for distillation data (disjoint from `eval_prompts`): 288 chat, 32
    code, 12 summarization."""
    chat = [t.format(topic) for topic in _TRAIN_TOPICS for t in _TRAIN_CHAT]
    code = [f"{lead} {task}." for task in _TRAIN_CODE
            for lead in ("Write a Python function that", "Show me short Python code that")]
    summ = [_summarize(p, s) for p in _TRAIN_PASSAGES
            for s in ("Summarize this text in two sentences:", "Give the main point of this text:")]
    return chat + code + summ


def eval_prompts() -> list[tuple[str, str]]:
    """(kind, user message) pairs: 18 chat, 16 code, 18 summarization (52 in all)."""
    styles = ["Summarize the following passage in one sentence.",
              "Summarize the following passage.",
              "Write a short summary of this text, reusing its key phrases."]
    summ = [_summarize(p, s) for p in PASSAGES for s in styles]
    return ([("chat", c) for c in _EVAL_CHAT] + [("code", c) for c in _EVAL_CODE]
            + [("summarization", s) for s in summ])
