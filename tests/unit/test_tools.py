"""Tools in generation: the calculator's arithmetic and refusals, calls run inside `generate`
(rows that call at different steps, limits, tools that raise or hang), and tool tokens without
log-probs.

The generation tests use a hand-made greedy chain model (`build_chain`): the next token depends
only on the current one, so a prompt's last token decides when its first call closes.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from posttrain.rollout import GenerationConfig, generate
from posttrain.tools import Toolbox, ToolConfig, ToolError, calc, calls_in

STRENGTH = 12.0
# the chain: other -> <calc> -> 7 -> * -> 3 -> </calc> -> (other) ...; the calculator then
# inserts " = 21\n" after each </calc>
CHAIN = {"<calc>": "7", "7": "*", "*": "3", "3": "</calc>"}


def build_chain():
    from conftest import build_model, build_tokenizer

    tok = build_tokenizer()
    tok.add_tokens(["<calc>", "</calc>"])
    model = build_model(tok)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<calc>", "</calc>", "7", "*", "3"]}
    classes = {ids[t]: k + 1 for k, t in enumerate(CHAIN)}  # every other token is class 0
    nxt = {0: ids["<calc>"], **{classes[ids[t]]: ids[s] for t, s in CHAIN.items()}}
    H = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:  # the last hidden state is the token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        basis = torch.eye(H)
        emb = model.model.embed_tokens.weight
        emb.copy_(basis[0].expand_as(emb))
        for token, c in classes.items():
            emb[token] = basis[c]
        head = torch.zeros_like(model.lm_head.weight)
        for c, token in nxt.items():  # RMSNorm(e_c) = sqrt(H) e_c: logit STRENGTH on its successor
            head[token] += STRENGTH / H**0.5 * basis[c]
        model.lm_head.weight.copy_(head)
    return model.eval(), tok


@pytest.fixture(scope="module")
def chain():
    return build_chain()


def toolbox(**kw) -> Toolbox:
    box = Toolbox.from_config(ToolConfig(names=kw.pop("names", ["calculator"]), **kw))
    assert box is not None
    return box


# ---------------------------------------------------------------------------------------------
# The calculator


def test_calculator_is_exact_arithmetic():
    assert calc("37 * 1.609344") == "59.545728"
    assert calc("(98.6 - 32) * 5/9") == "37"
    assert calc("2 ** 10") == "1024" and calc("-3 + +4") == "1"
    assert calc("1,250 / 1000") == "1.25"  # thousands separators
    assert calc("1 / 3") == "0.3333333333"


@pytest.mark.parametrize(
    "expression, message",
    [
        ("__import__('os').system('true')", "function calls are not allowed"),
        ("x + 1", "names are not allowed"),
        ("(1).real", "attributes are not allowed"),
        ("9 ** 9999", "exponent 9999 is out of range"),
        ("10 ** 40", "result too large"),
        ("1 / 0", "division by zero"),
        ("'a' * 3", "only numbers are allowed"),
        ("[1, 2]", "List is not allowed"),
        ("1 +", "cannot parse"),
        ("1" + "+1" * 150, "longer than"),
    ],
)
def test_calculator_refuses_with_a_message(expression, message):
    with pytest.raises(ToolError, match=message):
        calc(expression)
    out = toolbox().run("calc", expression)  # in a rollout: an error text, never an exception
    assert out.error and out.result.startswith("error: ") and message in out.result


def test_calculator_never_evaluates_model_text(monkeypatch):
    import builtins

    def no_eval(*a, **k):
        raise AssertionError("eval called")

    monkeypatch.setattr(builtins, "eval", no_eval)
    assert calc("6 * 7") == "42"


def test_calls_and_result_spans_in_finished_text():
    box = toolbox()
    text = (
        "1 mile = 1609.344 meters.\n<calc>2 * 1609.344</calc> = 3218.688\n<answer>3218.688</answer>"
    )
    ((start, end),) = box.result_spans(text)
    assert text[start:end] == " = 3218.688\n"
    (call,) = calls_in(text, box)
    assert (call.tool, call.call, call.result, call.error) == (
        "calc",
        "2 * 1609.344",
        "3218.688",
        False,
    )


def test_a_tool_with_bad_arguments_gets_an_error_text(tmp_path):
    path = tmp_path / "mytools.py"
    path.write_text("def lookup(city: str, year: int) -> str:\n    return f'{city} {year}'\n")
    box = toolbox(names=[f"{path}:lookup"])
    ok = box.run("lookup", '{"city": "Paris", "year": 2024}')
    assert (ok.result, ok.error) == ("Paris 2024", False)
    bad = box.run("lookup", '{"town": "Paris"}')
    assert bad.error and "no argument 'town'" in bad.result
    unknown = box.run("nope", "1")
    assert unknown.error and "no tool 'nope'" in unknown.result


# ---------------------------------------------------------------------------------------------
# Calls inside generate


def first_call_step(roll, i: int) -> int:
    return int(roll.tool_mask[i].nonzero()[0]) if roll.tool_mask[i].any() else -1


def test_rows_that_call_at_different_steps_match_each_row_alone(chain):
    """Greedy: rows whose first call closes at different steps give the same tokens, tool
    masks and log-probs in one batch as each alone (the other rows never wait, nothing is
    pre-filled again)."""
    model, tok = chain
    prompts = ["hello world", "6 *", "3 * 7", "x <calc>"]  # last tokens of different classes
    cfg = GenerationConfig(max_new_tokens=24, temperature=0.0)
    box = toolbox()
    batch = generate(model, tok, prompts, cfg, tools=box)
    steps = [first_call_step(batch, i) for i in range(len(prompts))]
    assert len(set(steps)) >= 3, steps  # the rows really do call at different steps
    for i, p in enumerate(prompts):
        alone = generate(model, tok, [p], cfg, tools=box)
        T = alone.completion_ids.shape[1]
        assert torch.equal(alone.completion_ids[0], batch.completion_ids[i, :T])
        assert torch.equal(alone.tool_mask[0], batch.tool_mask[i, :T])
        torch.testing.assert_close(alone.logp[0], batch.logp[i, :T])
        assert alone.completions[0] == batch.completions[i]
    assert "<calc>7*3</calc> = 21\n" in batch.completions[0]
    assert all(c.result == "21" for c in batch.tool_calls[0])


def test_tool_tokens_have_no_log_prob_and_sampled_ones_the_model_s(chain):
    """Hand-computed: a chain token is sampled with logit STRENGTH against 0 for the V - 1 others,
    log p = S - log(e^S + V - 1); tool-inserted tokens get 0 and are left out of policy_mask."""
    model, tok = chain
    roll = generate(model, tok, ["hello world"], GenerationConfig(max_new_tokens=16, temperature=0.0), tools=toolbox())  # fmt: skip
    V = len(tok)
    expected = STRENGTH - math.log(math.exp(STRENGTH) + V - 1)
    tool = roll.tool_mask[0].bool()
    assert tool.any() and (~tool).any()
    assert torch.all(roll.logp[0][tool] == 0)
    torch.testing.assert_close(roll.logp[0][~tool], torch.full(((~tool).sum(),), expected))
    assert torch.equal(roll.policy_mask[0], (~tool).float())
    assert roll.num_tokens == int((~tool).sum())
    # the inserted tokens are exactly the calculator's result text
    inserted = tok.decode(roll.completion_ids[0][tool].tolist())
    assert inserted.startswith(" = 21\n")


def test_the_call_limit_holds(chain):
    model, tok = chain
    roll = generate(model, tok, ["hello world"], GenerationConfig(max_new_tokens=60, temperature=0.0), tools=toolbox(max_calls=2))  # fmt: skip
    calls = roll.tool_calls[0]
    assert len(calls) >= 3
    assert [c.error for c in calls[:2]] == [False, False]
    assert all(c.error and "at most 2 tool calls" in c.result for c in calls[2:])


def test_tools_that_raise_or_hang_never_stop_a_run(chain, tmp_path):
    model, tok = chain
    path = tmp_path / "bad_tools.py"
    path.write_text(
        "import time\n"
        "def calc(expression: str) -> str:\n"
        "    if expression == '7*3':\n"
        "        time.sleep(30)\n"
        "    raise RuntimeError('boom')\n"
    )
    box = toolbox(names=[f"{path}:calc"], timeout_s=0.2)
    t0 = time.perf_counter()
    roll = generate(model, tok, ["hello world", "3 * 7"], GenerationConfig(max_new_tokens=30, temperature=0.0), tools=box)  # fmt: skip
    assert time.perf_counter() - t0 < 10
    results = {c.result for row in roll.tool_calls for c in row}
    assert "error: no result within 0.2 s" in results
    assert roll.finish_reasons == ["length", "length"]  # both rows decoded to the end
    assert all(c.error for row in roll.tool_calls for c in row)


def test_long_results_are_cut(tmp_path, chain):
    model, tok = chain
    path = tmp_path / "long_tools.py"
    path.write_text("def calc(expression: str) -> str:\n    return '9' * 500\n")
    box = toolbox(names=[f"{path}:calc"], max_result_tokens=5)
    roll = generate(model, tok, ["hello world"], GenerationConfig(max_new_tokens=12, temperature=0.0), tools=box)  # fmt: skip
    inserted = roll.tool_mask[0].bool()  # one call: <calc>7*3</calc> (5 tokens), then its result
    assert 0 < int(inserted.sum()) <= 5
    assert tok.decode(roll.completion_ids[0][inserted][:5].tolist()).startswith(" = ")


def test_json_call_format_finds_runs_and_marks_results():
    """The chat templates' style: <tool_call>{"name", "arguments"}</tool_call>, the result in
    <tool_response> tags; schemas come from the type hints and docstring."""
    box = toolbox(format="json")
    text = 'Let me compute. <tool_call>{"name": "calc", "arguments": {"expression": "2.5 * 4"}}</tool_call>'
    name, args, end = box.find_call(text)
    assert end == len(text)
    call = box.run(name, args)
    assert (call.tool, call.result, call.error) == ("calc", "10", False)
    full = text + box.format_result(call.result) + "So <answer>10</answer>"
    ((start, stop),) = box.result_spans(full)
    assert full[start:stop] == "\n<tool_response>\n10\n</tool_response>\n"
    (found,) = calls_in(full, box)
    assert found.result == "10" and not found.error
    bad = box.run("", '{"name": "calc"')  # not JSON: an error text
    assert bad.error and "a call is" in bad.result
    (schema,) = box.schemas()
    assert schema["function"]["name"] == "calc"
    assert "expression" in schema["function"]["parameters"]["properties"]


def test_unknown_tool_specs_are_one_line_errors():
    from posttrain.config import ConfigError

    with pytest.raises(ConfigError, match="use calculator, module:function"):
        toolbox(names=["abacus"])
    with pytest.raises(ConfigError, match="tool 'no_such_module:f': cannot import"):
        toolbox(names=["no_such_module:f"])
    with pytest.raises(ConfigError, match="tools.max_calls must be >= 1"):
        toolbox(max_calls=0)
