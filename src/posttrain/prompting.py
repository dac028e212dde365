"""Prompting strategies: zero-shot, few-shot, chain of thought, self-consistency, self-reflection,
tree of thought. The prompt formats and answer parsing they share with training live in
posttrain.prompts.

A *prompt* is either raw text (for base models, or SFT-style "question -> <answer>x</answer>"
training) or a list of chat messages (rendered by the tokenizer's chat template). Every strategy is
a small function over a *generator*, `gen(prompts, GenerationConfig) -> list[str]` (cfg.n
completions per prompt, contiguous), so it is batched over questions and testable with a fake:

    gen = model_generator(model, tok)
    outs = self_consistency(gen, questions, n=5, parse=parse_answer)
    outs[0].completion   # the text the task scores; outs[0].trace holds the sampled paths

`model_generator` wraps `posttrain.rollout.generate` and adds one thing: a chat prompt whose last
message is from the assistant is *continued* (rendered without closing that message), which is how
self-reflection and tree-of-thought extend partial answers.

Training algorithms call `prompts.build_prompt(question, strategy, examples=..., instruction=...)`
(through a task's rows) so that training and evaluation see the same prompt format.

Calls to the generator per strategy (a test pins these): zero_shot, few_shot, cot, direct: 1;
self_consistency: 1 (n samples per question); self_reflection: 3 (answer, critique, revision);
tree_of_thought: depth expansions + depth scorings (model scorer) + 1 final answer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.config import ConfigError
from posttrain.prompts import (
    DEFAULT_INSTRUCTION,
    TRAINING_STRATEGIES,
    Example,
    build_prompt,
    extend,
    majority_vote,
    nearest_examples,
    parse_answer,
)
from posttrain.rollout import GenerationConfig, Prompt
from posttrain.tools import Toolbox

Generator = Callable[[list[Prompt], GenerationConfig], list[str]]
Parser = Callable[[str], Any]

CRITIQUE_REQUEST = (
    "Check the answer above for mistakes (the conversion factor, the arithmetic, the units). "
    "Reply in one or two short sentences."
)
REVISE_REQUEST = "Now give the corrected final answer inside <answer></answer>."
VALUE_REQUEST = (
    "Question: {question}\nPartial reasoning: {partial}\n"
    "Is this reasoning on track to the right answer? Reply with one word: sure, likely or impossible."
)
EXTRACTION_CUE = "\nTherefore, the final answer is <answer>"
VALUE_WORDS = {"sure": 1.0, "likely": 0.5, "impossible": 0.0}

STRATEGIES = (
    "default",
    "direct",
    "zero_shot",
    "few_shot",
    "cot",
    "self_consistency",
    "self_reflection",
    "tree_of_thought",
)


@dataclass
class PromptingConfig:
    shots: int = 3
    """few_shot: worked examples taken from the train split"""
    samples: int = 5
    """self_consistency: reasoning paths sampled per question"""
    temperature: float = 0.7
    """self_consistency and tree_of_thought: sampling temperature of the paths"""
    breadth: int = 3
    """tree_of_thought: thoughts sampled per kept path, and paths kept per level"""
    depth: int = 2
    """tree_of_thought: levels of partial thoughts before the final answer"""
    thought_tokens: int = 40
    """tree_of_thought: most tokens per thought (a thought also ends at a newline)"""
    scorer: str = "model"
    """tree_of_thought: who scores partial thoughts: model (the model rates itself) or verifier (the task's checker)"""
    critique_tokens: int = 64
    """self_reflection: most tokens of the critique"""
    examples: str = "nearest"
    """few_shot: which train examples: nearest (per question, the k with the most words in common) or first (the same k for every question)"""
    answer_extraction: bool = False
    """every strategy but direct: when a final completion has no <answer>, continue it with "Therefore, the final answer is <answer>" (the second stage of Kojima et al. 2022)"""


@dataclass
class Output:
    """One question's result: the completion the task scores, and the intermediate texts."""

    completion: str
    trace: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The generator


def model_generator(
    model: Any, tokenizer: Any, *, progress: bool = False, tools: Toolbox | None = None
) -> Generator:
    """`gen(prompts, cfg) -> completions` over posttrain.rollout.generate.

    Chat prompts ending in an assistant message are rendered so that the model continues that
    message; the batch is then passed on as raw text. With `tools`, every call may use them (so
    every strategy does); a completion holds its calls and their results.
    """
    from posttrain.rollout import generate

    def gen(prompts: list[Prompt], cfg: GenerationConfig) -> list[str]:
        if any(not isinstance(p, str) and p[-1]["role"] == "assistant" for p in prompts):
            prompts = [render_continuation(tokenizer, p, cfg, tools) for p in prompts]
            cfg = dataclasses.replace(cfg, chat=False)
        return generate(model, tokenizer, prompts, cfg, progress=progress, tools=tools).completions

    return gen


def render_continuation(
    tokenizer: Any, prompt: Prompt, cfg: GenerationConfig, tools: Toolbox | None = None
) -> str:
    """Render a prompt to text; a final assistant message is left open for the model to continue.
    `tools` in the json format give the template their schemas."""
    from posttrain.rollout import render_prompts

    if isinstance(prompt, str):
        return render_prompts(tokenizer, [prompt], cfg, tools)[0]
    head, tail = (
        (prompt[:-1], prompt[-1]["content"]) if prompt[-1]["role"] == "assistant" else (prompt, "")
    )
    text = render_prompts(tokenizer, [head], dataclasses.replace(cfg, chat=True), tools)[0] + tail
    # The raw-text path tokenizes with special tokens; do not let a BOS appear twice.
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


# ---------------------------------------------------------------------------------------------
# Strategies (each: questions in, one Output per question out)


def _answer_cfg(gen_cfg: GenerationConfig, **changes: Any) -> GenerationConfig:
    return dataclasses.replace(gen_cfg, **{"stop": ["</answer>"], "n": 1, **changes})


def single_call(
    gen: Generator,
    questions: Sequence[str],
    strategy: str,
    *,
    gen_cfg: GenerationConfig,
    examples: Sequence[Example] = (),
    shots: int = 3,
    nearest: bool = False,
    instruction: str = DEFAULT_INSTRUCTION,
    chat: bool = True,
    extract_answer: bool = False,
) -> list[Output]:
    """zero_shot, few_shot, cot or direct: one prompt per question, one generator call (two with
    `extract_answer`, see `extract_answers`). few_shot uses the first `shots` examples, or with
    `nearest` the `shots` examples whose questions share the most words with each question."""

    def pick(q: str) -> Sequence[Example]:
        return nearest_examples(q, examples, shots) if nearest else examples[:shots]

    prompts = [
        build_prompt(q, strategy, examples=pick(q), instruction=instruction, chat=chat)
        for q in questions
    ]
    chat = chat and strategy != "direct"
    outs = gen(prompts, _answer_cfg(gen_cfg, chat=chat))
    if not extract_answer:
        return [Output(o) for o in outs]
    return extract_answers(gen, prompts, outs, gen_cfg=_answer_cfg(gen_cfg, chat=chat))


def extract_answers(
    gen: Generator, prompts: Sequence[Prompt], outs: Sequence[str], *, gen_cfg: GenerationConfig
) -> list[Output]:
    """Kojima et al. (2022)'s answer extraction: a completion without an <answer> tag is continued
    after "Therefore, the final answer is <answer>" (one more call, only for those completions)."""
    todo = [i for i, o in enumerate(outs) if "<answer>" not in o]
    results = [Output(o) for o in outs]
    if not todo:
        return results
    heads = [outs[i].rstrip() + EXTRACTION_CUE for i in todo]
    cfg = dataclasses.replace(gen_cfg, max_new_tokens=16, n=1)
    tails = gen([extend(prompts[i], h) for i, h in zip(todo, heads)], cfg)
    for i, h, t in zip(todo, heads, tails):
        results[i] = Output(h + t, trace=[outs[i]])
    return results


def zero_shot(gen: Generator, questions: Sequence[str], **kw: Any) -> list[Output]:
    return single_call(gen, questions, "zero_shot", **kw)


def few_shot(gen: Generator, questions: Sequence[str], **kw: Any) -> list[Output]:
    return single_call(gen, questions, "few_shot", **kw)


def cot(gen: Generator, questions: Sequence[str], **kw: Any) -> list[Output]:
    return single_call(gen, questions, "cot", **kw)


def self_consistency(
    gen: Generator,
    questions: Sequence[str],
    *,
    gen_cfg: GenerationConfig,
    n: int = 5,
    temperature: float = 0.7,
    parse: Parser = parse_answer,
    instruction: str = DEFAULT_INSTRUCTION,
    chat: bool = True,
    extract_answer: bool = False,
) -> list[Output]:
    """Sample n chain-of-thought paths per question; keep a path whose answer wins the vote."""
    prompts = [build_prompt(q, "cot", instruction=instruction, chat=chat) for q in questions]
    outs = gen(prompts, _answer_cfg(gen_cfg, n=n, temperature=temperature, chat=chat))
    if extract_answer:  # greedy answer extraction for each path without a tag
        each = [p for p in prompts for _ in range(n)]
        outs = [
            o.completion
            for o in extract_answers(gen, each, outs, gen_cfg=_answer_cfg(gen_cfg, chat=chat))
        ]
    results = []
    for i in range(len(questions)):
        paths = outs[i * n : (i + 1) * n]
        best, _ = majority_vote([parse(p) for p in paths])
        results.append(Output(paths[0 if best is None else best], trace=paths))
    return results


def self_reflection(
    gen: Generator,
    questions: Sequence[str],
    *,
    gen_cfg: GenerationConfig,
    critique_tokens: int = 64,
    instruction: str = DEFAULT_INSTRUCTION,
    chat: bool = True,
    extract_answer: bool = False,
) -> list[Output]:
    """Answer (cot), critique the answer, then revise it: three batched generator calls."""
    prompts = [build_prompt(q, "cot", instruction=instruction, chat=chat) for q in questions]
    first = gen(prompts, _answer_cfg(gen_cfg, chat=chat))
    critique_prompts = [extend(p, a, CRITIQUE_REQUEST) for p, a in zip(prompts, first)]
    critiques = gen(
        critique_prompts,
        dataclasses.replace(gen_cfg, n=1, stop=[], max_new_tokens=critique_tokens, chat=chat),
    )
    revise_prompts = [extend(p, c, REVISE_REQUEST) for p, c in zip(critique_prompts, critiques)]
    final = gen(revise_prompts, _answer_cfg(gen_cfg, chat=chat))
    if extract_answer:
        final = [
            o.completion
            for o in extract_answers(
                gen, revise_prompts, final, gen_cfg=_answer_cfg(gen_cfg, chat=chat)
            )
        ]
    return [Output(f, trace=[a, c]) for a, c, f in zip(first, critiques, final)]


def model_value(gen: Generator, gen_cfg: GenerationConfig, chat: bool) -> Callable:
    """A thought scorer that asks the model itself: sure / likely / impossible -> 1 / 0.5 / 0."""

    def score(questions: list[str], partials: list[str]) -> list[float]:
        prompts: list[Prompt] = [
            VALUE_REQUEST.format(question=q, partial=p.strip()) for q, p in zip(questions, partials)
        ]
        cfg = dataclasses.replace(
            gen_cfg, n=1, stop=[], max_new_tokens=4, temperature=0.0, chat=chat
        )
        replies = gen(prompts, cfg)
        out = []
        for r in replies:
            words = re.findall(r"[a-z]+", r.lower())
            out.append(next((VALUE_WORDS[w] for w in words if w in VALUE_WORDS), 0.25))
        return out

    return score


def tree_of_thought(
    gen: Generator,
    questions: Sequence[str],
    *,
    gen_cfg: GenerationConfig,
    breadth: int = 3,
    depth: int = 2,
    temperature: float = 0.7,
    thought_tokens: int = 40,
    scorer: Callable[[list[str], list[str]], list[float]] | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    chat: bool = True,
    extract_answer: bool = False,
) -> list[Output]:
    """Breadth-first tree of thought (Yao et al. 2023, BFS variant).

    Each level samples `breadth` next thoughts (one line each) for every kept path, scores the
    partial paths with `scorer(questions, partials) -> scores` (default: the model rates itself),
    and keeps the `breadth` best per question. Paths that already hold an <answer> are not extended.
    After `depth` levels the best path is completed up to its answer.
    """
    scorer = scorer or model_value(gen, gen_cfg, chat)
    roots = [build_prompt(q, "cot", instruction=instruction, chat=chat) for q in questions]
    beams: list[list[tuple[float, str]]] = [[(0.0, "")] for _ in questions]
    thought_cfg = dataclasses.replace(
        gen_cfg,
        n=breadth,
        temperature=temperature,
        max_new_tokens=thought_tokens,
        stop=["\n", "</answer>"],
        chat=chat,
    )
    for _ in range(depth):
        open_ = [
            (i, path) for i, beam in enumerate(beams) for _, path in beam if "</answer>" not in path
        ]
        if not open_:
            break
        outs = gen(
            [extend(roots[i], path + "\n") if path else roots[i] for i, path in open_], thought_cfg
        )
        cands = [
            (i, (path + "\n" + o.strip()).strip())
            for k, (i, path) in enumerate(open_)
            for o in outs[k * breadth : (k + 1) * breadth]
        ]
        scores = scorer([questions[i] for i, _ in cands], [p for _, p in cands])
        for i in range(len(questions)):
            done = [(s, p) for s, p in beams[i] if "</answer>" in p]
            mine = done + [(s, p) for (j, p), s in zip(cands, scores) if j == i]
            beams[i] = sorted(mine, key=lambda sp: -sp[0])[:breadth]
    best = [beams[i][0][1] for i in range(len(questions))]
    todo = [i for i, p in enumerate(best) if "</answer>" not in p]
    results = [Output(p, trace=[p2 for _, p2 in beams[i]]) for i, p in enumerate(best)]
    if todo:
        finals = gen(
            [extend(roots[i], best[i] + "\n") if best[i] else roots[i] for i in todo],
            _answer_cfg(gen_cfg, chat=chat),
        )
        for i, f in zip(todo, finals):
            results[i].completion = (best[i] + "\n" + f).strip()
    if extract_answer:
        fixed = extract_answers(
            gen, roots, [r.completion for r in results], gen_cfg=_answer_cfg(gen_cfg, chat=chat)
        )
        for r, f in zip(results, fixed):
            r.completion = f.completion
    return results


def run_strategy(
    strategy: str,
    gen: Generator,
    questions: Sequence[str],
    *,
    gen_cfg: GenerationConfig,
    cfg: PromptingConfig | None = None,
    examples: Sequence[Example] = (),
    instruction: str = DEFAULT_INSTRUCTION,
    chat: bool = True,
    parse: Parser = parse_answer,
    verifier: Callable[[list[str], list[str]], list[float]] | None = None,
) -> list[Output]:
    """Dispatch a strategy by name with its hyper-parameters from a PromptingConfig."""
    cfg = cfg or PromptingConfig()
    common = {"gen_cfg": gen_cfg, "instruction": instruction, "chat": chat}
    if cfg.examples not in ("first", "nearest"):
        raise ConfigError(f"prompting.examples must be first or nearest, not {cfg.examples!r}")
    if strategy in TRAINING_STRATEGIES:
        return single_call(
            gen,
            questions,
            strategy,
            examples=examples,
            shots=cfg.shots,
            nearest=cfg.examples == "nearest",
            extract_answer=cfg.answer_extraction and strategy != "direct",
            **common,
        )
    common["extract_answer"] = cfg.answer_extraction
    if strategy == "self_consistency":
        return self_consistency(
            gen, questions, n=cfg.samples, temperature=cfg.temperature, parse=parse, **common
        )
    if strategy == "self_reflection":
        return self_reflection(gen, questions, critique_tokens=cfg.critique_tokens, **common)
    if strategy == "tree_of_thought":
        if cfg.scorer not in ("model", "verifier"):
            raise ConfigError(f"prompting.scorer must be model or verifier, not {cfg.scorer!r}")
        if cfg.scorer == "verifier" and verifier is None:
            raise ConfigError("this task has no thought verifier; use --prompting.scorer=model")
        return tree_of_thought(
            gen,
            questions,
            breadth=cfg.breadth,
            depth=cfg.depth,
            temperature=cfg.temperature,
            thought_tokens=cfg.thought_tokens,
            scorer=verifier if cfg.scorer == "verifier" else None,
            **common,
        )
    raise ConfigError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
