"""Real English sentences for text-model calibration: the prose of Python's own Language Reference.

``pydoc_data.topics`` is CPython's standard library (the text ``help()`` shows): no install, no
download, 79 topics of edited English. Sentences are extracted deterministically: unindented
prose paragraphs only (indented blocks are grammar, code or tables), split at sentence ends,
kept when they read like prose (7-28 words, capitalised, ending in '.', no code characters,
brackets, colons or semicolons, at least 85% plain words), de-duplicated in order. Python 3.11.7
gives 488 sentences. The text is tied to the CPython version, so tests check counts, not hashes.

Split: a sentence is held out when sha1(sentence) % 4 == 0 (3.11.7: 365 calibration, 123
holdout). Its side depends only on its own text, so a patch release that edits a paragraph
moves only that paragraph's sentences. Each side is ordered by the same hash, so the first N
(what quantizers and the parity set take) mix all topics rather than the alphabetically first.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

HOLDOUT_EVERY = 4
MIN_WORDS, MAX_WORDS = 7, 28
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_LIKE = re.compile(r"::=|>>>|\.\.\.|[{}\[\]<>|=*`_\\@#$%^~]|\b(e\.g|i\.e|etc|cf|vs|Fig)\.?$")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def _prose_paragraphs(text: str):
    paragraph: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith((" ", "\t")) or set(line.strip()) <= set("*=-~^"):
            if paragraph:
                yield " ".join(paragraph)
            paragraph = []
            continue
        paragraph.append(line.strip())
    if paragraph:
        yield " ".join(paragraph)


def prose_sentences(text: str):
    """The sentences of ``text`` that read like prose (see the module docstring)."""
    for paragraph in _prose_paragraphs(text):
        paragraph = paragraph.replace('"', "")  # pydoc quotes code names: "if" -> if
        for sentence in _SENTENCE_END.split(paragraph):
            sentence = " ".join(sentence.split())
            words = sentence.split()
            if not MIN_WORDS <= len(words) <= MAX_WORDS:
                continue
            if not (sentence[0].isupper() and sentence.endswith(".")) or _CODE_LIKE.search(sentence):
                continue
            if "(" in sentence or ")" in sentence or ":" in sentence[:-1] or ";" in sentence:
                continue
            if len(_WORD.findall(sentence)) < 0.85 * len(words):
                continue
            yield sentence


@lru_cache(maxsize=None)
def reference_sentences() -> tuple[str, ...]:
    """Every distinct prose sentence of pydoc_data.topics, topics in sorted key order."""
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for key in sorted(topics):
        for sentence in prose_sentences(topics[key]):
            seen.setdefault(sentence, None)
    return tuple(seen)


def _digest(sentence: str) -> int:
    return int(hashlib.sha1(sentence.encode()).hexdigest(), 16)


def split_sentences(sentences: tuple[str, ...] | None = None) -> tuple[list[str], list[str]]:
    """(calibration, holdout): disjoint, each ordered by its sentences' sha1."""
    sentences = reference_sentences() if sentences is None else sentences
    ordered = sorted(sentences, key=_digest)
    holdout = [s for s in ordered if _digest(s) % HOLDOUT_EVERY == 0]
    calibration = [s for s in ordered if _digest(s) % HOLDOUT_EVERY != 0]
    return calibration, holdout
