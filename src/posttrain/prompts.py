"""Prompts and answers: the prompt formats training and evaluation share, and reading answers back.

`build_prompt(question, strategy, examples=..., instruction=...)` is the one prompt of a
single-call strategy (direct, zero_shot, few_shot, cot); the tasks build their training rows with
it, so training and `posttrain eval` see the same format. `nearest_examples` picks few-shot examples
by word overlap. `parse_answer` reads the number in the last <answer>...</answer> (`parse_number`
handles `6,000`, `1.5e3`, `3/4`, decimal commas), and `majority_vote` groups equal answers for
self-consistency. The strategies that call a model (posttrain.prompting) are built on these.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

from posttrain.config import ConfigError
from posttrain.rollout import Prompt

Example = tuple[str, str]  # (question, worked solution ending in <answer>x</answer>)

DEFAULT_INSTRUCTION = (
    "Answer the question. Be concise. Write the final answer inside <answer></answer>, "
    "for example <answer>42</answer>."
)
COT_SUFFIX = "Think step by step in one or two short sentences, then give the final answer."
TRAINING_STRATEGIES = ("direct", "zero_shot", "few_shot", "cot")


# ---------------------------------------------------------------------------------------------
# Answers


_NUM = r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?"
_SCI = re.compile(
    rf"({_NUM})\s*(?:[eE]([-+]?\d+)|(?:x|×|\*)\s*10\s*(?:\^|\*\*)\s*\(?([-+−]?\d+)\)?)?"
)
_FRACTION = re.compile(r"^\s*([-+−]?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)")


def answer_span(text: str) -> str | None:
    """The text of the last <answer>...</answer> (an unclosed last <answer> runs to the end)."""
    start = text.rfind("<answer>")
    if start < 0:
        return None
    body = text[start + len("<answer>") :]
    end = body.find("</answer>")
    return body if end < 0 else body[:end]


def parse_number(text: str) -> float | None:
    """The first number in `text`: `6000`, `6,000`, `-1.5`, `.5`, `1.5e3`, `1.5 x 10^3`, `3/4`.

    Commas followed by three digits are thousands separators; a single other comma between digits
    is a decimal comma (`2,5` -> 2.5). Units and words around the number are ignored.
    """
    text = text.strip().replace("\u2212", "-").replace("\u00a0", " ")
    text = re.sub(r"(?<=\d) (?=\d{3}\b)", "", text)  # 6 000 -> 6000
    m = _FRACTION.match(text)
    if m and float(m.group(2)) != 0:
        return float(m.group(1)) / float(m.group(2))
    text = re.sub(r"(?<=\d),(?=\d{1,2}\b|\d{4,})", ".", text)  # decimal comma
    for m in _SCI.finditer(text):
        mant = m.group(1)
        if not re.search(r"\d", mant):
            continue
        value = float(mant.replace(",", "").replace("−", "-"))
        exp = m.group(2) or m.group(3)
        if exp is not None:
            value *= 10.0 ** int(exp.replace("−", "-"))
        return value if math.isfinite(value) else None
    return None


def parse_answer(text: str) -> float | None:
    """The number inside the last <answer>...</answer> tag, or None when missing/unparseable."""
    span = answer_span(text)
    return None if span is None else parse_number(span)


def vote_key(value: Any) -> Hashable:
    """Answers that count as the same vote: floats to 6 significant digits, text stripped/lowered."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, str):
        return " ".join(value.lower().split())
    return value


def majority_vote(answers: Sequence[Any]) -> tuple[int | None, int]:
    """(index of the first answer in the winning group, its vote count); None answers do not vote.

    Ties go to the answer that appeared first. Returns (None, 0) when no answer parsed.
    """
    keys = [None if a is None else vote_key(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None, 0
    best = max(counts.values())
    for i, k in enumerate(keys):
        if k is not None and counts[k] == best:
            return i, best
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Building prompts


def format_example(question: str, solution: str) -> str:
    return f"Question: {question}\nAnswer: {solution}"


def build_prompt(
    question: str,
    strategy: str = "cot",
    *,
    examples: Sequence[Example] = (),
    instruction: str = DEFAULT_INSTRUCTION,
    chat: bool = True,
) -> Prompt:
    """The prompt for one question under a single-call strategy.

    direct: the raw question and a space, to be completed with `<answer>x</answer>` (SFT style, no
    chat template). zero_shot: instruction + question. cot: the instruction asks for short
    step-by-step reasoning first. few_shot: as cot, with each example as a user/assistant turn.
    With chat=False the same content is laid out as "Question: ...\\nAnswer:" text.
    """
    if strategy == "direct":
        return f"{question} "
    if strategy not in ("zero_shot", "cot", "few_shot"):
        raise ConfigError(
            f"no single-call prompt for strategy {strategy!r}; use one of {', '.join(TRAINING_STRATEGIES)}"
        )
    if strategy == "few_shot" and not examples:
        raise ConfigError("few_shot needs worked examples (the task's train split is empty?)")
    system = instruction if strategy == "zero_shot" else f"{instruction} {COT_SUFFIX}"
    shots = examples if strategy == "few_shot" else ()
    if not chat:
        parts = [
            system,
            *(format_example(q, s) for q, s in shots),
            f"Question: {question}\nAnswer:",
        ]
        return "\n\n".join(parts)
    msgs = [{"role": "system", "content": system}]
    for q, s in shots:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": s}]
    return [*msgs, {"role": "user", "content": question}]


def extend(prompt: Prompt, assistant: str, user: str | None = None) -> Prompt:
    """Append an assistant turn (and optionally a new user turn) to a chat or raw-text prompt.

    Without `user`, the result ends in the assistant's text, which the generator continues.
    """
    if isinstance(prompt, str):
        text = prompt + (" " if not prompt.endswith((" ", "\n")) else "") + assistant
        return text + (f"\n\n{user}\nAnswer:" if user is not None else "")
    msgs = [*prompt, {"role": "assistant", "content": assistant}]
    return msgs + ([{"role": "user", "content": user}] if user is not None else [])


# ---------------------------------------------------------------------------------------------
# Choosing few-shot examples


@functools.lru_cache(maxsize=65536)
def question_words(text: str) -> frozenset[str]:
    """Lower-cased words of a question; numbers do not count."""
    return frozenset(re.findall(r"°?[a-z][a-z0-9^/]*", text.lower()))


def nearest_examples(question: str, pool: Sequence[Example], k: int) -> list[Example]:
    """The k examples whose questions are most similar to `question` (Jaccard overlap of lower-cased
    word sets; ties keep pool order), most similar last, right before the question (Liu et al. 2022
    choose in-context examples by similarity the same way, with embeddings)."""

    q = question_words(question)
    scores = [len(q & question_words(e[0])) / max(len(q | question_words(e[0])), 1) for e in pool]
    top = sorted(range(len(pool)), key=lambda i: (-scores[i], i))[:k]
    return [pool[i] for i in reversed(top)]
