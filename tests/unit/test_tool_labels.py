"""Training data that holds tool calls: the tool results get label -100 (no loss), the rest of the
completion is trained as usual. Expected labels are written out token by token on the tiny
tokenizer of tests/conftest.py."""

from __future__ import annotations

import pytest

from posttrain.data import (
    IGNORE_INDEX,
    encode_messages,
    encode_prompt_completion,
    encode_text,
    tool_labels,
)
from posttrain.tools import Toolbox, ToolConfig

X = IGNORE_INDEX
COMPLETION = "<calc>3 * 4</calc> = 12\n<answer>12</answer>"


@pytest.fixture(scope="module")
def tok():
    from conftest import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def tools():
    return Toolbox.from_config(ToolConfig(names=["calculator"]))


def _pieces(tok, ids):
    return [tok.decode([i]) for i in ids]


def test_result_tokens_of_a_tag_call_get_no_label(tok, tools):
    """The tiny tokenizer splits the completion into 29 tokens:
        <  c  a  l  c  >  3  ' '  *  ' '  4  </  c  a  l  c  >  ' ='  ' 1'  2  \\n  <  answer  > ...
    The calculator's result " = 12\\n" is characters 18-24 = tokens 17 (' ='), 18 (' 1'), 19 ('2'),
    20 ('\\n'): exactly those four get -100; the call itself and the answer after it are labels."""
    ids, labels = tool_labels(tok, COMPLETION, tools)
    pieces = _pieces(tok, ids)
    assert pieces[11:21] == ["</", "c", "a", "l", "c", ">", " =", " 1", "2", "\n"]
    assert labels == ids[:17] + [X, X, X, X] + ids[21:]
    assert len(ids) == 29
    # no tools: every token is a label, and the ids are the same
    ids0, labels0 = tool_labels(tok, COMPLETION, None)
    assert ids0 == ids and labels0 == ids


def test_prompt_completion_with_tools(tok, tools):
    prompt = "How many grams "
    p = tok(prompt)["input_ids"]
    c = tok(COMPLETION, add_special_tokens=False)["input_ids"]
    ex = encode_prompt_completion(tok, prompt, COMPLETION, max_length=128, tools=tools)
    eos = tok.eos_token_id
    assert ex["input_ids"] == p + c + [eos]
    assert ex["labels"] == [X] * len(p) + c[:17] + [X] * 4 + c[21:] + [eos]
    # the tool-less encoding is unchanged
    plain = encode_prompt_completion(tok, prompt, COMPLETION, max_length=128)
    assert plain["labels"] == [X] * len(p) + c + [eos]


def test_two_calls_and_plain_text(tok, tools):
    text = "<calc>1+1</calc> = 2\nthen <calc>2*3</calc> = 6\n"
    ex = encode_text(tok, text, max_length=128, tools=tools)
    masked = [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab == X]
    assert tok.decode(masked) == " = 2\n = 6\n"
    kept = [lab for lab in ex["labels"] if lab != X]
    assert tok.decode(kept[:-1]) == "<calc>1+1</calc>then <calc>2*3</calc>"


def test_messages_mask_results_inside_assistant_turns(tok, tools):
    msgs = [
        {"role": "user", "content": "3 times 4?"},
        {"role": "assistant", "content": COMPLETION},
    ]
    ex = encode_messages(tok, msgs, max_length=256, tools=tools)
    labelled = [lab for lab in ex["labels"] if lab != X]
    c = tok(COMPLETION + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert labelled == c[:17] + c[21:]
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(msgs, tokenize=False)


def test_json_format_masks_the_tool_response(tok):
    tools = Toolbox.from_config(ToolConfig(names=["calculator"], format="json"))
    call = '<tool_call>{"name": "calc", "arguments": {"expression": "2+2"}}</tool_call>'
    text = call + "\n<tool_response>\n4\n</tool_response>\n<answer>4</answer>"
    ids, labels = tool_labels(tok, text, tools)
    masked = tok.decode([i for i, lab in zip(ids, labels) if lab == X])
    assert masked == "\n<tool_response>\n4\n</tool_response>\n"
    assert tok.decode([lab for lab in labels if lab != X]) == call + "<answer>4</answer>"


def test_a_token_across_the_result_boundary_is_masked(tools):
    """A token that holds both model text and tool text gets no loss (never train the model to
    write what a tool wrote). In '<calc>1</calc> = 1\nX' the result ' = 1\n' is characters 14-19;
    a fake fast tokenizer cuts the text into (0, 14) the call, (14, 16) ' =' and (16, 20) ' 1\nX',
    which straddles the result's end: labels [1, -100, -100]."""

    class Fake:
        is_fast = True

        def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
            return {"input_ids": [1, 2, 3], "offset_mapping": [(0, 14), (14, 16), (16, 20)]}

    text = "<calc>1</calc> = 1\nX"
    assert tools.result_spans(text) == [(14, 19)]
    ids, labels = tool_labels(Fake(), text, tools)
    assert ids == [1, 2, 3] and labels == [1, X, X]


def test_dpo_pair_mask_leaves_out_tool_results(tok, tools):
    """chosen = COMPLETION (29 tokens, results at 17-20) + EOS; rejected = " no" + EOS. The loss
    mask of the chosen row is 1 on its 26 policy tokens and 0 on the 4 result tokens; the summed
    log-prob is the sum of the per-token log-probs at those 26 positions only."""
    import torch

    from posttrain.algos.dpo import pair_logps
    from posttrain.ops import selective_log_softmax
    from posttrain.preferences import PairsConfig, collate_pairs, tokenize_pairs

    rec = {"prompt": "What is 3 * 4? ", "chosen": COMPLETION, "rejected": " no"}
    (item,), _ = tokenize_pairs(tok, [rec], PairsConfig(), tools=tools)
    assert item["chosen_mask"] == [1] * 17 + [0] * 4 + [1] * 8 + [1]
    assert item["rejected_mask"] == [1] * len(item["rejected_ids"])
    batch = collate_pairs([item], tok.pad_token_id)
    T = batch.n_completion
    assert T == 30 and batch.mask[0].tolist() == [1.0] * 17 + [0.0] * 4 + [1.0] * 9
    n_rej = len(item["rejected_ids"])
    assert batch.mask[1].tolist() == [1.0] * n_rej + [0.0] * (T - n_rej)
    (plain,), _ = tokenize_pairs(tok, [rec], PairsConfig())
    assert "chosen_mask" not in plain and plain["chosen_ids"] == item["chosen_ids"]

    from conftest import build_model

    model = build_model(tok)
    with torch.no_grad():
        logp = pair_logps(model, batch)  # (2,)
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        tok_logp = selective_log_softmax(full[:, -T - 1 : -1], batch.input_ids[:, -T:])  # (2, T)
    keep = [t for t in range(T) if not 17 <= t <= 20]
    assert torch.allclose(logp[0], tok_logp[0, keep].sum(), atol=1e-4)
    assert not torch.allclose(logp[0], tok_logp[0].sum(), atol=1e-4)


def test_distill_loss_skips_tool_tokens():
    """V = 2, labels [-100, 0, -100, 1]: position 2 is a tool result (label -100 from tool_labels),
    so positions 0 and 2 predict labels and position 1 predicts the tool token. The student's
    logits are 0 where they count (CE = log 2 each, KL to a uniform teacher = 0) and wildly off at
    position 1. With w = 0.5, T = 1: loss = 0.5 * (log 2 + log 2) / 2 + 0.5 * 0 = 0.5 * log 2."""
    import math

    import torch

    from posttrain.algos.distill import distill_loss

    labels = torch.tensor([[X, 0, X, 1]])
    student = torch.zeros(1, 4, 2)
    student[0, 1] = torch.tensor([20.0, -20.0])  # predicts the tool token: must not count
    teacher = torch.zeros(1, 4, 2)
    loss, m = distill_loss(student, teacher, labels, weight=0.5, temperature=1.0)
    assert loss.item() == pytest.approx(0.5 * math.log(2), abs=1e-6)
    assert m["tokens"].item() == 2 and m["kl"].item() == pytest.approx(0.0, abs=1e-6)
