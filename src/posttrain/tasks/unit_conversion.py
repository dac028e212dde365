"""Unit conversion ("well reasoned unit conversion"): generated questions with exact answers.

    "How many grams are there per 6 kg?"  ->  6000.0

Questions cover length, mass, volume, time, speed, area, data size and temperature, in several
phrasings, with integer and decimal values. Ground truth is exact (`posttrain.tasks.units`: every
unit's size as a Fraction, temperatures by their affine formulas); the answer is the exact result
rounded once to a float.

Each row carries two worked solutions: `solution` (the factor as a fact, then the arithmetic
written out, for few-shot prompts) and `tool_solution` (each unit's size as a fact, the arithmetic
as a calculator call, see `posttrain.tools`), the SFT target of configs/sft_unit_conversion_tools.toml.
`train_phrasing = "varied"` words the train questions in many more ways than the test's templates.

Splits are reproducible from the seed and disjoint: questions are drawn from one seeded stream,
de-duplicated on (from unit, to unit, value), and each distinct conversion is assigned to a split by
a hash of itself and the seed (80 / 7 / 13 % of the stream), so no conversion appears in two splits
whatever phrasing it gets, and a split's rows do not depend on the other splits' sizes.

Answers are read from the last <answer>...</answer> (posttrain.prompting.parse_answer). A
prediction p is correct when |p - y| <= rel_tol * |y| (rel_tol defaults to 1e-2); when the true
answer y is 0 the test is |p| <= rel_tol.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from typing import Any

import torch

from posttrain.config import ConfigError
from posttrain.prompting import Example, build_prompt, nearest_examples, parse_answer
from posttrain.rollout import GenerationConfig
from posttrain.tasks.base import Batch, Split, TaskConfig
from posttrain.tasks.units import (
    ALIASES,
    BY_KEY,
    DIMENSIONS,
    TEMPERATURE_RULES,
    UNITS,
    Unit,
    convert,
)
from posttrain.tools import calc, format_number

DEFAULT_SIZES = {"train": 1000, "validation": 100, "test": 200}
EASY_SIZES = {"train": 600, "validation": 50, "test": 200}  # about 2,000 distinct easy questions
SPLIT_SHARES = (("train", 80), ("validation", 7), ("test", 13))  # out of 100 hash buckets

INSTRUCTION = (
    "You convert units. Be concise. Write the final number (no units) inside "
    "<answer></answer>, for example <answer>6000</answer>."
)


TEMPLATES = [
    "How many {to} are there per {value} {src}?",
    "Convert {value} {src} to {to}.",
    "What is {value} {src} in {to}?",
    "{value} {src} is how many {to}?",
    "Express {value} {src} in {to}.",
    "How many {to} is {value} {src}?",
    "If something measures {value} {src}, how many {to} is that?",
]
TEMPERATURE_TEMPLATES = [
    "Convert {value} {src} to {to}.",
    "What is {value} {src} in {to}?",
    "{value} {src} is how many {to}?",
    "A thermometer reads {value} {src}. What is that in {to}?",
]


# Train questions under `train_phrasing = "varied"`: more wordings and unit names than the test's
# templates, so that a trained model reads questions, not one generator's sentences.
VARIED_TEMPLATES = [
    *TEMPLATES,
    "How many {to} are in {value} {src}?",
    "{value} {src} equals how many {to}?",
    "Please convert {value} {src} into {to}.",
    "I have {value} {src}. How much is that in {to}?",
    "What's {value} {src} expressed in {to}?",
    "Turn {value} {src} into {to}.",
    "{value} {src} to {to}?",
    "Change {value} {src} to {to}.",
    "Find the number of {to} in {value} {src}.",
    "How much is {value} {src} in {to}?",
    "What does {value} {src} come to in {to}?",
    "Convert from {src} to {to}: {value}",
    "{value} {src} = ? {to}",
    "How many {to} make up {value} {src}?",
    "What is the equivalent of {value} {src} in {to}?",
    "Calculate {value} {src} in {to}.",
    "Give me {value} {src} in {to}, please.",
    "could you tell me how many {to} {value} {src} is",
    "{value} {src} in {to}",
]
CONTEXT_TEMPLATES = {  # one sentence of context per dimension
    "length": ["A trail is {value} {src} long. How long is it in {to}?", "The distance is {value} {src}. What is it in {to}?"],
    "mass": ["A parcel weighs {value} {src}. What is its weight in {to}?", "The recipe needs {value} {src} of flour. How many {to} is that?"],
    "volume": ["A tank holds {value} {src}. How many {to} is that?", "The bottle contains {value} {src}. Express it in {to}."],
    "time": ["A task takes {value} {src}. How many {to} is that?", "The video lasts {value} {src}. How long is it in {to}?"],
    "speed": ["A car drives at {value} {src}. What is that speed in {to}?", "The wind blows at {value} {src}. Give the speed in {to}."],
    "area": ["A field covers {value} {src}. What is its area in {to}?", "The flat has {value} {src} of floor space. How many {to} is that?"],
    "data": ["A file is {value} {src}. How big is it in {to}?", "The download is {value} {src}. What is its size in {to}?"],
    "temperature": ["The oven is at {value} {src}. What is that in {to}?", "It is {value} {src} outside. What is the temperature in {to}?"],
}  # fmt: skip


def solution(value: str, src: str, dst: str) -> str:
    """A short worked solution ending in <answer>...</answer> (few-shot examples, SFT targets)."""
    a, b = BY_KEY[src], BY_KEY[dst]
    ans = format_number(convert(value, src, dst))
    if a.dimension == "temperature":
        rule, arithmetic = TEMPERATURE_RULES[(src, dst)]
        return f"{rule}. {arithmetic.format(v=value)} = <answer>{ans}</answer>"
    factor = format_number(a.factor / b.factor)
    return f"1 {a.singular} = {factor} {b.plural}. {value} * {factor} = <answer>{ans}</answer>"


# The unit each dimension's facts are stated in, in worked solutions that call the calculator: one
# fact per unit ("1 mile = 1609.344 meters"), whichever pair is asked, and factors of at least 1
# for the common units.
FACT_UNITS = {"length": "m", "mass": "g", "volume": "ml", "time": "s", "speed": "km/h", "area": "m2", "data": "B"}  # fmt: skip


def tool_solution(value: str, src: str, dst: str) -> str:
    """A worked solution that states each unit's size in its dimension's fact unit (FACT_UNITS)
    as a fact and does the arithmetic with one calculator call (`posttrain.tools`, tag format):
    multiply by the source unit's size, divide by the target's. The result after the call is what
    the calculator returns, and the answer repeats it:

        1 mile = 1609.344 meters. 1 kilometer = 1000 meters.
        <calc>4.2 * 1609.344 / 1000</calc> = 6.7592448
        <answer>6.7592448</answer>

    So a model learns one fact per unit, not one per pair of units, and one rule for the
    arithmetic; temperatures state their formula instead. Factors keep 7 significant digits (an
    error under 1e-6, far inside the task's tolerance)."""
    a, b = BY_KEY[src], BY_KEY[dst]
    v = value.replace(",", "")
    if a.dimension == "temperature":
        rule, arithmetic = TEMPERATURE_RULES[(src, dst)]
        facts, expr = f"{rule}.", arithmetic.format(v=v)
    else:
        base = BY_KEY[FACT_UNITS[a.dimension]]
        facts_list, expr = [], v
        for unit, op in ((a, "*"), (b, "/")):
            if unit is base:
                continue
            f = format_number(unit.factor / base.factor, 7)
            facts_list.append(f"1 {unit.singular} = {f} {base.plural}.")
            expr += f" {op} {f}"
        facts = " ".join(facts_list)
    result = calc(expr)
    return f"{facts}\n<calc>{expr}</calc> = {result}\n<answer>{result}</answer>"


def varied_question(key: str, seed: int, value: str, src: Unit, dst: Unit) -> str:
    """A question in one of many wordings and unit names, drawn from a generator of its own
    (seeded by the conversion), so the main stream and the other splits do not move."""
    rng = random.Random(f"{seed}:{key}:varied")
    dim = src.dimension
    pool = (
        TEMPERATURE_TEMPLATES if dim == "temperature" else VARIED_TEMPLATES
    ) + CONTEXT_TEMPLATES[dim]
    template = rng.choice(pool)
    if value.isdigit() and int(value) >= 1000 and rng.random() < 0.3:
        value = f"{int(value):,}"

    def name(u: Unit, plural: bool) -> str:
        names = [u.plural if plural else u.singular, u.abbrev, *ALIASES.get(u.key, [])]
        return rng.choice(names) if rng.random() < 0.6 else names[0]

    q = template.format(value=value, src=name(src, value != "1"), to=name(dst, True))
    return q[0].upper() + q[1:] if rng.random() < 0.85 else q


def _value(rng: random.Random, dimension: str) -> str:
    kind = rng.random()
    if dimension == "temperature":  # kelvin values are drawn by the caller
        return str(rng.randint(-40, 120)) if kind < 0.7 else f"{rng.uniform(-40, 120):.1f}"
    if kind < 0.55:
        return str(rng.randint(1, 100))
    if kind < 0.75:
        return str(rng.randint(101, 5000))
    return f"{rng.uniform(0.1, 100):.{rng.choice([1, 2])}f}"


def _bucket(key: str, seed: int) -> int:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) % 100


def split_of(key: str, seed: int) -> str:
    b = _bucket(key, seed)
    for name, share in SPLIT_SHARES:
        if b < share:
            return name
        b -= share
    raise AssertionError("shares sum to 100")


def easy_pairs() -> list[tuple[Unit, Unit]]:
    """(from, to) unit pairs of the easy level: the answer is the value times a small integer
    (at most 24, or 60) or a power of ten, e.g. kg -> g (x1000), ft -> in (x12), h -> min (x60)."""
    pairs = []
    for a in UNITS:
        for b in UNITS:
            if a is b or a.dimension != b.dimension or a.dimension == "temperature":
                continue
            r = a.factor / b.factor
            if r.denominator == 1 and (2 <= r <= 24 or r in (60, 100, 1000)):
                pairs.append((a, b))
    return pairs


def generate_questions(
    seed: int, sizes: dict[str, int], difficulty: str = "standard", train_phrasing: str = "fixed"
) -> dict[str, list[dict[str, Any]]]:
    """Rows for every split, drawn from one seeded stream (see the module docstring).

    difficulty "easy" draws only `easy_pairs()` with integer values 1-50: a curriculum level that
    a 135M model can learn (it rarely multiplies arbitrary decimals right).
    train_phrasing "varied" words train questions with `varied_question` (other splits unchanged).
    """
    rng = random.Random(seed)
    easy = easy_pairs() if difficulty == "easy" else []
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in sizes}
    seen: set[str] = set()
    attempts = 0
    limit = 50 * sum(sizes.values()) + 10_000
    while any(len(out[s]) < n for s, n in sizes.items()):
        attempts += 1
        if attempts > limit:
            raise ConfigError(f"could not generate {sizes} distinct unit conversion questions")
        if easy:
            src, dst = rng.choice(easy)
            dim, value = src.dimension, str(rng.randint(1, 50))
        else:
            dim = rng.choice(DIMENSIONS)
            src, dst = rng.sample([u for u in UNITS if u.dimension == dim], 2)
            value = _value(rng, dim) if src.key != "K" else str(rng.randint(200, 400))
        key = f"{src.key}|{dst.key}|{value}"
        if key in seen:
            continue
        seen.add(key)
        # draw every random choice before the split test, so that one split's rows do not depend
        # on whether another split is already full
        template = rng.choice(TEMPERATURE_TEMPLATES if dim == "temperature" else TEMPLATES)
        short = rng.random() < 0.4
        split = split_of(key, seed)
        if split not in out or len(out[split]) >= sizes[split]:
            continue
        src_name = src.abbrev if short else (src.singular if value == "1" else src.plural)
        question = template.format(value=value, src=src_name, to=dst.plural)
        question = question[0].upper() + question[1:]
        if split == "train" and train_phrasing == "varied":
            question = varied_question(key, seed, value, src, dst)
        out[split].append(
            {
                "question": question,
                "answer": convert(value, src.key, dst.key),
                "value": value,
                "from_unit": src.key,
                "to_unit": dst.key,
                "dimension": dim,
                "solution": solution(value, src.key, dst.key),
                "tool_solution": tool_solution(value, src.key, dst.key),
            }
        )
    return out


def is_correct(pred: float | None, answer: float, rel_tol: float = 0.01) -> bool:
    """|pred - answer| <= rel_tol * |answer|; for answer 0, |pred| <= rel_tol."""
    if pred is None or not math.isfinite(pred):
        return False
    if answer == 0:
        return abs(pred) <= rel_tol
    return abs(pred - answer) <= rel_tol * abs(answer)


_EQUATION = re.compile(
    r"(-?\d[\d,]*\.?\d*(?:e-?\d+)?)\s*([*x×/])\s*(-?\d[\d,]*\.?\d*(?:e-?\d+)?)\s*=\s*(?:<answer>)?\s*(-?\d[\d,]*\.?\d*(?:e-?\d+)?)"
)


def check_arithmetic(text: str, rel_tol: float = 0.01) -> float:
    """A verifier for partial reasoning that needs no ground truth: the share of `a * b = c` and
    `a / b = c` statements in `text` that are arithmetically right (0.5 when there are none)."""
    found = _EQUATION.findall(text)
    if not found:
        return 0.5
    ok = 0
    for a, op, b, c in found:
        try:
            x, y, z = (float(s.replace(",", "")) for s in (a, b, c))
        except ValueError:
            continue
        if op == "/" and y == 0:
            continue
        ok += is_correct(z, x / y if op == "/" else x * y, rel_tol)
    return ok / len(found)


class UnitConversionTask:
    """Generated unit-conversion questions; reward 1 for a correct <answer> (+ format_reward)."""

    name = "unit_conversion"
    instruction = INSTRUCTION

    def __init__(self, cfg: TaskConfig):
        if cfg.source is not None:
            raise ConfigError(
                "unit_conversion generates its own questions; for your own question/answer data "
                "use --task.name=custom with --task.answer_column"
            )
        if cfg.rel_tol < 0:
            raise ConfigError(f"task.rel_tol must be >= 0, got {cfg.rel_tol}")
        self.cfg = cfg
        self.chat = cfg.strategy != "direct"
        defaults = EASY_SIZES if cfg.difficulty == "easy" else DEFAULT_SIZES
        self.sizes = {
            "train": cfg.train_size or defaults["train"],
            "validation": cfg.validation_size or defaults["validation"],
            "test": cfg.test_size or defaults["test"],
        }
        self._rows: dict[str, list[dict[str, Any]]] | None = None

    def _all(self) -> dict[str, list[dict[str, Any]]]:
        if self._rows is None:
            raw = generate_questions(
                self.cfg.seed, self.sizes, self.cfg.difficulty, self.cfg.train_phrasing
            )
            examples = self.examples(train=raw["train"])
            pool = [(r["question"], r["solution"]) for r in raw["train"]]
            for rows in raw.values():
                for r in rows:
                    if self.cfg.strategy == "few_shot":
                        # the 3 most similar train questions (as `posttrain eval --strategy
                        # few_shot` picks them), never the question itself
                        others = [e for e in pool if e[0] != r["question"]]
                        shots = nearest_examples(r["question"], others, 3)
                    else:
                        shots = examples
                    r["prompt"] = build_prompt(
                        r["question"],
                        self.cfg.strategy,
                        examples=shots,
                        instruction=self.instruction,
                        chat=self.chat,
                    )
            self._rows = raw
        return self._rows

    def rows(self, split: Split) -> list[dict[str, Any]]:
        if split not in self.sizes:
            raise ConfigError(f"unknown split {split!r}; use train, validation or test")
        return [dict(r) for r in self._all()[split]]

    tool_examples = True  # worked examples that call the calculator exist (`tool_solution`)

    def examples(
        self, k: int = 3, train: list[dict[str, Any]] | None = None, tools: bool = False
    ) -> list[Example]:
        """Worked examples for few-shot prompts: the first train rows of k different dimensions
        (temperature left out: its worked solution is a formula, not a factor); with tools, the
        solutions that call the calculator."""
        train = self._all()["train"] if train is None else train
        key = "tool_solution" if tools else "solution"
        picked: list[Example] = []
        dims: set[str] = set()
        for r in train:
            if r["dimension"] not in dims and r["dimension"] != "temperature":
                dims.add(r["dimension"])
                picked.append((r["question"], r[key]))
            if len(picked) == k:
                break
        return picked

    def example_pool(self, tools: bool = False) -> list[Example]:
        """Every train row as a worked example (for examples picked per question); with tools,
        the solutions that call the calculator."""
        key = "tool_solution" if tools else "solution"
        return [(r["question"], r[key]) for r in self._all()["train"]]

    def generation(self) -> GenerationConfig:
        direct = self.cfg.strategy in ("direct", "zero_shot")
        return GenerationConfig(
            max_new_tokens=24 if direct else 96,
            temperature=1.0,
            stop=["</answer>"],
            chat=self.chat,
        )

    def parse(self, completion: str) -> float | None:
        return parse_answer(completion)

    def verify_thoughts(self, questions: list[str], partials: list[str]) -> list[float]:
        """Tree-of-thought verifier: arithmetic consistency of each partial path."""
        return [check_arithmetic(p, self.cfg.rel_tol) for p in partials]

    def reward(self, prompts: list[str], completions: list[str], batch: Batch) -> torch.Tensor:
        preds = [parse_answer(c) for c in completions]
        r = [
            float(is_correct(p, a, self.cfg.rel_tol)) + self.cfg.format_reward * (p is not None)
            for p, a in zip(preds, batch["answer"])
        ]
        return torch.tensor(r, dtype=torch.float32)

    def evaluate(
        self, completions: list[str], batch: Batch
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        if len(completions) != len(batch["answer"]):
            raise ValueError(
                f"unit_conversion.evaluate got {len(completions)} completions for "
                f"{len(batch['answer'])} rows; pass one completion per row"
            )
        per = []
        for c, a in zip(completions, batch["answer"]):
            p = parse_answer(c)
            per.append({"parsed": p, "correct": is_correct(p, a, self.cfg.rel_tol)})
        n = max(len(per), 1)
        summary = {
            "accuracy": sum(r["correct"] for r in per) / n,
            "answer_rate": sum(r["parsed"] is not None for r in per) / n,
        }
        # accuracy per dimension (length, mass, ...), where the rows say which
        dims = batch.get("dimension") or [None] * len(per)
        for d in sorted({d for d in dims if d}):
            hits = [r["correct"] for r, rd in zip(per, dims) if rd == d]
            summary[f"accuracy/{d}"] = sum(hits) / max(len(hits), 1)
        return summary, per
