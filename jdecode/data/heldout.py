"""Held-out natural text for perplexity: prose paragraphs of the Python language reference,
which ships with every CPython (`pydoc_data.topics`). The target never generated it, and no
trained part was trained on it.

The reference changes a little between Python versions, so a perplexity is compared only with
another computed in the same run; `text_id` names the exact text used.
"""

from __future__ import annotations

import hashlib
import re
import sys

# Topics with long prose paragraphs (grammar rules and code are filtered out below).
TOPICS = ("execmodel", "naming", "exceptions", "types", "assignment", "try", "function",
          "class", "truth", "for", "while")
_PROSE = re.compile(r"[A-Za-z ,.;:'()\"-]+")


def prose_paragraphs(max_paragraphs: int = 32, min_chars: int = 200) -> list[str]:
    """Up to `max_paragraphs` paragraphs of plain English (no indented code or grammar, at
    least `min_chars` long), in a fixed order, each joined onto one line."""
    from pydoc_data.topics import topics

    out = []
    for name in TOPICS:
        for para in topics.get(name, "").split("\n\n"):
            lines = para.splitlines()
            if not lines or any(line.startswith((" ", "*", "=", "-")) for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            letters = sum(len(m) for m in _PROSE.findall(text))
            if len(text) >= min_chars and letters >= 0.95 * len(text):
                out.append(text)
            if len(out) == max_paragraphs:
                return out
    return out


def text_id(paragraphs: list[str]) -> str:
    """Names the text: the Python version it came from and a hash of it."""
    digest = hashlib.sha256("\n".join(paragraphs).encode()).hexdigest()[:12]
    return f"pydoc_data.topics (Python {sys.version_info.major}.{sys.version_info.minor}) " \
           f"{len(paragraphs)} paragraphs sha256:{digest}"
