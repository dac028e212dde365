"""Prompting strategies: answer parsing, majority vote, prompt shapes, calls per strategy (a fake
generator counts them), and every strategy once on the tiny model."""

from __future__ import annotations

import dataclasses

import pytest

from posttrain.config import ConfigError
from posttrain.prompting import (
    PromptingConfig,
    model_generator,
    render_continuation,
    run_strategy,
    self_consistency,
    self_reflection,
    tree_of_thought,
)
from posttrain.prompts import build_prompt, extend, majority_vote, parse_answer, parse_number
from posttrain.rollout import GenerationConfig

GEN = GenerationConfig(max_new_tokens=8, temperature=0.0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1 kg = 1000 g. 6 * 1000 = <answer>6000</answer>", 6000.0),
        ("<answer>6,000</answer>", 6000.0),
        ("<answer>1,234,567.5</answer>", 1234567.5),
        ("<answer>2,5</answer>", 2.5),  # decimal comma
        ("<answer>6 000</answer>", 6000.0),
        ("<answer>1.5e3</answer>", 1500.0),
        ("<answer>1.5E-3</answer>", 0.0015),
        ("<answer>1.5 x 10^3</answer>", 1500.0),
        ("<answer>2.5 × 10^-2</answer>", 0.025),
        ("<answer>6000 grams</answer>", 6000.0),
        ("<answer> about 6000 g </answer>", 6000.0),
        ("<answer>-40</answer>", -40.0),
        ("<answer>−3.5</answer>", -3.5),  # unicode minus
        ("<answer>.5</answer>", 0.5),
        ("<answer>3/4</answer>", 0.75),
        ("<answer>1</answer> wait, <answer>2</answer>", 2.0),  # several tags: the last
        ("<answer>7", 7.0),  # unclosed last tag runs to the end
        ("the answer is 6000", None),  # no tag
        ("<answer>six thousand</answer>", None),
        ("<answer></answer>", None),
        ("", None),
    ],
)
def test_parse_answer(text, expected):
    got = parse_answer(text)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_parse_number_plain():
    assert parse_number("42") == 42.0
    assert parse_number("no digits") is None


def test_majority_vote():
    # 2.0 wins with two votes (1.9999999 rounds to the same 6-significant-digit key)
    assert majority_vote([1.0, 2.0, None, 1.9999999, 3.0]) == (1, 2)
    # ties go to the answer seen first
    assert majority_vote([5.0, 4.0, 4.0, 5.0]) == (0, 2)
    assert majority_vote([None, None]) == (None, 0)
    assert majority_vote(["Paris ", "paris", "Rome"]) == (0, 2)


def test_build_prompt_shapes():
    ex = [("Convert 1 m to cm.", "1 m = 100 cm. <answer>100</answer>")]
    assert build_prompt("Q?", "direct") == "Q? "
    zs = build_prompt("Q?", "zero_shot", instruction="INSTR")
    assert zs == [{"role": "system", "content": "INSTR"}, {"role": "user", "content": "Q?"}]
    fs = build_prompt("Q?", "few_shot", examples=ex, instruction="INSTR")
    assert [m["role"] for m in fs] == ["system", "user", "assistant", "user"]
    assert fs[2]["content"] == ex[0][1]
    assert "step by step" in build_prompt("Q?", "cot")[0]["content"]
    raw = build_prompt("Q?", "few_shot", examples=ex, instruction="INSTR", chat=False)
    assert (
        isinstance(raw, str) and raw.startswith("INSTR") and raw.endswith("Question: Q?\nAnswer:")
    )
    assert "Answer: 1 m = 100 cm." in raw
    with pytest.raises(ConfigError, match="few_shot needs worked examples"):
        build_prompt("Q?", "few_shot")
    with pytest.raises(ConfigError, match="no single-call prompt"):
        build_prompt("Q?", "self_consistency")


def test_extend_chat_and_raw():
    msgs = [{"role": "user", "content": "Q"}]
    assert extend(msgs, "A", "B")[-2:] == [
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "B"},
    ]
    assert extend(msgs, "partial")[-1] == {"role": "assistant", "content": "partial"}
    assert (
        extend("Question: Q\nAnswer:", "A", "Check") == "Question: Q\nAnswer: A\n\nCheck\nAnswer:"
    )


class FakeGen:
    """Records calls; answers with scripted texts (cycled), n per prompt."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls: list[tuple[list, GenerationConfig]] = []
        self.k = 0

    def __call__(self, prompts, cfg):
        self.calls.append((list(prompts), cfg))
        out = []
        for _ in range(len(prompts) * cfg.n):
            out.append(self.replies[self.k % len(self.replies)])
            self.k += 1
        return out


def test_self_consistency_votes_per_question():
    # question 0 gets answers 1, 2, 2 -> keeps a path saying 2; question 1 gets 3, none, 3 -> 3
    gen = FakeGen(
        [
            "<answer>1</answer>",
            "<answer>2</answer>",
            "x <answer>2.0</answer>",
            "<answer>3</answer>",
            "no tag",
            "y <answer>3</answer>",
        ]
    )
    outs = self_consistency(gen, ["q0", "q1"], gen_cfg=GEN, n=3, temperature=0.9)
    assert len(gen.calls) == 1
    prompts, cfg = gen.calls[0]
    assert len(prompts) == 2 and cfg.n == 3 and cfg.temperature == 0.9
    assert cfg.stop == ["</answer>"]
    assert outs[0].completion == "<answer>2</answer>" and len(outs[0].trace) == 3
    assert outs[1].completion == "<answer>3</answer>"


def test_self_reflection_three_calls():
    gen = FakeGen(["<answer>5</answer>", "The factor is wrong.", "<answer>6</answer>"])
    outs = self_reflection(gen, ["q0"], gen_cfg=GEN)
    assert len(gen.calls) == 3
    critique_prompt = gen.calls[1][0][0]
    assert [m["role"] for m in critique_prompt][-2:] == ["assistant", "user"]
    assert critique_prompt[-2]["content"] == "<answer>5</answer>"
    revise_prompt = gen.calls[2][0][0]
    assert revise_prompt[-2]["content"] == "The factor is wrong."
    assert outs[0].completion == "<answer>6</answer>"
    assert outs[0].trace == ["<answer>5</answer>", "The factor is wrong."]


def test_tree_of_thought_calls_and_best_path():
    """breadth 2, depth 2, two questions: level 1 expands 2 roots (n=2) -> 4 candidates, level 2
    expands the 2 kept paths per question (4 prompts, n=2) -> 8 candidates, then one final call
    for the best path of each question. The verifier prefers longer paths containing "good"."""
    gen = FakeGen(["good step", "bad step"])

    def verifier(questions, partials):
        return [p.count("good") + 0.01 * len(p) for p in partials]

    outs = tree_of_thought(gen, ["q0", "q1"], gen_cfg=GEN, breadth=2, depth=2, scorer=verifier)
    assert [len(c[0]) for c in gen.calls] == [2, 4, 2]
    assert [c[1].n for c in gen.calls] == [2, 2, 1]
    assert gen.calls[0][1].stop == ["\n", "</answer>"]
    # the kept best path continues as an open assistant message
    assert gen.calls[2][0][0][-1]["role"] == "assistant"
    assert outs[0].completion.startswith("good step\ngood step")


def test_tree_of_thought_model_scorer_call_count():
    gen = FakeGen(["sure"])
    tree_of_thought(gen, ["q0"], gen_cfg=GEN, breadth=2, depth=3)
    # depth x (expand + score) + final answer
    assert len(gen.calls) == 3 * 2 + 1


def test_run_strategy_dispatch_and_errors():
    gen = FakeGen(["<answer>1</answer>"])
    outs = run_strategy("cot", gen, ["a", "b", "c"], gen_cfg=GEN)
    assert len(outs) == 3 and len(gen.calls) == 1
    with pytest.raises(ConfigError, match="unknown strategy"):
        run_strategy("magic", gen, ["a"], gen_cfg=GEN)
    with pytest.raises(ConfigError, match="no thought verifier"):
        run_strategy(
            "tree_of_thought", gen, ["a"], gen_cfg=GEN, cfg=PromptingConfig(scorer="verifier")
        )


def test_render_continuation_leaves_assistant_open(tiny):
    _, tok = tiny
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "1 kg ="}]
    text = render_continuation(tok, msgs, GenerationConfig(chat=True))
    assert text.endswith("<|im_start|>assistant\n1 kg =")


@pytest.mark.parametrize(
    "strategy",
    [
        "zero_shot",
        "few_shot",
        "cot",
        "direct",
        "self_consistency",
        "self_reflection",
        "tree_of_thought",
    ],
)
def test_every_strategy_on_tiny_model(tiny, strategy):
    model, tok = tiny
    calls = []
    inner = model_generator(model, tok)

    def gen(prompts, cfg):
        outs = inner(prompts, cfg)
        calls.append(len(outs))
        assert len(outs) == len(prompts) * cfg.n
        return outs

    cfg = PromptingConfig(samples=2, breadth=2, depth=1, thought_tokens=4, critique_tokens=4)
    examples = [("Convert 1 m to cm.", "<answer>100</answer>")]
    outs = run_strategy(
        strategy,
        gen,
        ["Convert 2 kg to g.", "What is 3 ft in in?"],
        gen_cfg=dataclasses.replace(GEN, max_new_tokens=4),
        cfg=cfg,
        examples=examples,
    )
    assert len(outs) == 2 and all(isinstance(o.completion, str) for o in outs)
    expected = {"self_consistency": [4], "self_reflection": [2, 2, 2], "tree_of_thought": [4, 4, 2]}
    assert calls == expected.get(strategy, [2])


def test_answer_extraction_second_stage_only_where_missing():
    gen = FakeGen(["6 kg is 6 * 1000 grams", "<answer>3</answer>", "6000</answer>"])
    cfg = PromptingConfig(answer_extraction=True)
    outs = run_strategy("cot", gen, ["q0", "q1"], gen_cfg=GEN, cfg=cfg)
    assert [len(c[0]) for c in gen.calls] == [2, 1]  # the second call only for q0
    cont = gen.calls[1][0][0]
    assert cont[-1]["role"] == "assistant"
    assert cont[-1]["content"].endswith("Therefore, the final answer is <answer>")
    assert parse_answer(outs[0].completion) == 6000.0
    assert outs[0].trace == ["6 kg is 6 * 1000 grams"]
    assert outs[1].completion == "<answer>3</answer>"


def test_answer_extraction_in_self_consistency_before_the_vote():
    gen = FakeGen(["reason a", "<answer>8</answer>", "reason c", "7</answer>", "7</answer>"])
    cfg = PromptingConfig(samples=3, answer_extraction=True)
    (out,) = run_strategy("self_consistency", gen, ["q0"], gen_cfg=GEN, cfg=cfg)
    assert [(len(p), c.n) for p, c in gen.calls] == [(1, 3), (2, 1)]  # paths 0 and 2 extracted
    assert parse_answer(out.completion) == 7.0  # 7 wins 2 to 1


@pytest.mark.parametrize("strategy", ["cot", "self_reflection", "tree_of_thought"])
def test_answer_extraction_on_tiny_model(tiny, strategy):
    """The random tiny model never writes <answer>, so every final completion is extracted."""
    model, tok = tiny
    cfg = PromptingConfig(
        breadth=2, depth=1, thought_tokens=3, critique_tokens=3, answer_extraction=True
    )
    outs = run_strategy(
        strategy, model_generator(model, tok), ["Convert 2 kg to g."],
        gen_cfg=dataclasses.replace(GEN, max_new_tokens=3), cfg=cfg,
    )  # fmt: skip
    assert "Therefore, the final answer is <answer>" in outs[0].completion


def test_nearest_examples_and_few_shot_selection():
    from posttrain.prompts import nearest_examples

    pool = [
        ("Convert 3 kg to grams.", "a"),
        ("What is 5 miles in feet?", "b"),
        ("How many grams are there per 2 kg?", "c"),
    ]
    # "How many grams are there per 6 kg?" shares all 6 words with c (Jaccard 1), 2 of 7 with a
    assert nearest_examples("How many grams are there per 6 kg?", pool, 2) == [pool[0], pool[2]]
    gen = FakeGen(["<answer>1</answer>"])
    cfg = PromptingConfig(shots=1, examples="nearest")
    run_strategy(
        "few_shot", gen, ["What is 7 miles in yards?"], gen_cfg=GEN, cfg=cfg, examples=pool
    )
    assert gen.calls[0][0][0][1]["content"] == "What is 5 miles in feet?"
    with pytest.raises(ConfigError, match="first or nearest"):
        run_strategy("cot", gen, ["q"], gen_cfg=GEN, cfg=PromptingConfig(examples="random"))


def test_strategies_on_raw_text_prompts():
    """Without a chat template every prompt stays a string; continuations append to it."""
    gen = FakeGen(["<answer>5</answer>", "Looks right.", "<answer>5</answer>"])
    self_reflection(gen, ["Convert 5 m to m."], gen_cfg=GEN, chat=False)
    first, critique, revise = (c[0][0] for c in gen.calls)
    assert all(isinstance(p, str) for p in (first, critique, revise))
    assert not any(c[1].chat for c in gen.calls)
    assert critique.startswith(first) and "Check the answer above" in critique
    assert revise.startswith(critique) and revise.endswith("inside <answer></answer>.\nAnswer:")
    gen = FakeGen(["step one"])
    tree_of_thought(
        gen, ["q"], gen_cfg=GEN, breadth=1, depth=1, scorer=lambda q, p: [1.0] * len(p), chat=False
    )
    assert gen.calls[-1][0][0].endswith("Answer: step one\n")
