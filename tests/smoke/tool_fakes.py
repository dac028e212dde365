"""A tiny model that calls the calculator: a bigram policy built by hand from the tiny Llama.

The random tiny model almost never writes `<calc>...</calc>`. This one does, on every prompt:
its attention and MLP outputs are zero (o_proj, down_proj), so the last hidden state is the
current token's embedding, and the embeddings and the LM head are set so that the next-token
logits are STRENGTH on the successors of the current token's class and 0 elsewhere:

    any other token -> <calc>        <calc> -> a digit 2..9
    a digit -> * or </calc>          *      -> a digit 2..9

so completions read `<calc>3*7</calc> = 21\\n<calc>5</calc> = 5\\n<calc>...`, with the result
tokens (" = 21\\n") inserted by the calculator. The digits and the `*` / `</calc>` choice are
real samples (log-probs log 1/8 and log 1/2), the tags nearly certain; the tool's tokens are
"other" tokens, to which the model gives about -STRENGTH log-prob: a loss or KL that counted them
would be far off. `<calc>` and `</calc>` are added to the tokenizer as single tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

STRENGTH = 20.0
DIGITS = [str(d) for d in range(2, 10)]


def build_caller(path: Path) -> Path:
    """Save the calling model and its tokenizer to `path` (loadable like any local model)."""
    from conftest import build_model, build_tokenizer

    tok = build_tokenizer()
    tok.add_tokens(["<calc>", "</calc>"])
    model = build_model(tok)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<calc>", "</calc>", "*", *DIGITS]}
    # classes: 0 other, 1 <calc>, 2 </calc> (its successor is never sampled: the result follows),
    # 3 *, 4.. the digits
    cls = {ids["<calc>"]: 1, ids["</calc>"]: 0, ids["*"]: 3}
    cls |= {ids[d]: 4 + k for k, d in enumerate(DIGITS)}
    successors = {0: [ids["<calc>"]], 1: [ids[d] for d in DIGITS], 3: [ids[d] for d in DIGITS]}
    successors |= {4 + k: [ids["*"], ids["</calc>"]] for k in range(len(DIGITS))}
    H = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        basis = torch.eye(H)
        emb = model.model.embed_tokens.weight
        emb.copy_(basis[0].expand_as(emb))  # every token "other" unless listed
        for token, c in cls.items():
            emb[token] = basis[c]
        # RMSNorm(e_c) = sqrt(H) e_c, so a head row STRENGTH / sqrt(H) e_c gives logit STRENGTH
        head = torch.zeros_like(model.lm_head.weight)
        for c, nxt in successors.items():
            for token in nxt:
                head[token] += STRENGTH / H**0.5 * basis[c]
        model.lm_head.weight.copy_(head)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# a reward with some spread: the number of multiplications, over ten
REWARD_PY = (
    "def stars(prompts, completions, batch):\n    return [c.count('*') / 10 for c in completions]\n"
)
