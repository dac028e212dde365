"""Batched generation with left padding and a KV cache, returning a typed `Rollout`.

Every algorithm and the evaluator sample through `generate`. Prompts are tokenized once, sorted by
length and split into micro-batches whose size follows a token budget (rows x (prompt + new
tokens)), left-padded so that generation starts at the same column for every row, then decoded
token by token with the model's KV cache. Sampling: greedy (temperature 0), temperature, top-k,
top-p; stops at EOS (the tokenizer's and the model's) and at stop strings.

With the lean decoder (`posttrain.decoder`, Llama models on a CPU) and more rows than one
micro-batch holds, the rows decode as one continuous batch instead (`_stream_decode`,
`continuous_batching`; not with tools): as many slots as the largest micro-batch (or
batch_size), and once a quarter of the slots are free, the next rows' prompts are prefilled into
them, so that few steps decode for rows that have already finished. A row's tokens are the same
either way. It pays where completions end at very different lengths (1.22x at 256 new tokens
in bench/generation.py) and is even where most rows run to max_new_tokens (0.99-1.01x at 64: a
refill's prefill reads every weight for a few rows), see docs/benchmarks.md.

Seeded sampling (`generate(..., seeds=)`, one seed per prompt): row j of prompt i draws its random
numbers from its own generator seeded with mix_seed(seeds[i], j), one uniform per token, and picks
the token by inverting the cumulative distribution. Its tokens then do not depend on the other rows
of the batch, the micro-batching or the process that samples it (up to float noise in the logits);
online RL uses this so that 2 processes x 2 prompts sample what 1 process x 4 prompts samples.
Without seeds, the uniforms come from torch's global RNG (one per row and step, the same
inverse-CDF draw).

`Rollout.logp` holds the log-probability of each sampled token under the sampling policy, that is
log_softmax(logits / temperature) before top-k/top-p truncation (temperature 1 for greedy): the same
quantity a teacher-forced pass with the same temperature gives, so PPO-style ratios start at 1.

`generate_sequential` is the plain one-prompt-at-a-time generator, kept to compare against.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from posttrain import cpu
from posttrain.config import check
from posttrain.decoder import SUPPORTED, LeanDecoder
from posttrain.forwards import SharedStart, prompt_pass
from posttrain.ops import position_ids_from_mask
from posttrain.sampling import StopChecker, filter_logits, inverse_cdf, mix_seed, row_uniforms
from posttrain.tools import Toolbox, ToolCall, ToolRunner

Prompt = str | list[dict[str, str]]


@dataclass
class GenerationConfig:
    max_new_tokens: int = check(64, ">= 1")
    """most tokens generated per completion"""
    temperature: float = check(1.0, ">= 0")
    """sampling temperature; 0 means greedy decoding"""
    top_k: int = check(0, ">= 0")
    """keep the k most likely tokens (0: off)"""
    top_p: float = check(1.0, "in (0, 1]")
    """nucleus sampling: keep the smallest set with this total probability (1: off)"""
    n: int = check(1, ">= 1")
    """samples per prompt (rows of one prompt are contiguous in the Rollout)"""
    stop: list[str] = field(default_factory=list)
    """stop strings: a completion ends after the first one it produces (kept in the text)"""
    chat: bool = False
    """wrap string prompts as a user message and apply the tokenizer's chat template"""
    system_prompt: str | None = None
    """system message for chat prompts"""
    max_prompt_tokens: int = check(1024, ">= 1")
    """prompts longer than this keep their last tokens"""
    token_budget: int = check(32768, ">= 1")
    """micro-batch size limit in tokens (rows x (prompt + max_new_tokens)); bounds memory (the
    continuous batch of the lean decoder: its slots x (longest prompt + max_new_tokens))"""
    max_batch_size: int = check(64, ">= 1")
    """micro-batch size limit in rows (and slots of the lean decoder's continuous batch): past
    this the KV cache copies of each step cost more than batching saves on a CPU"""
    lean_decoder: bool = True
    """decode Llama-architecture models on the CPU with posttrain's lean step
    (`posttrain.decoder`: fused products, a KV cache allocated once); false, or another model:
    the model's own forward"""
    continuous_batching: bool = True
    """with the lean decoder and more rows than one micro-batch: one continuous batch whose
    finished rows hand their slots to the next rows, a quarter of the slots at a time; false:
    micro-batch after micro-batch, each until its longest row ends. The same tokens either way"""
    sample_dtype: Literal["model", "bfloat16"] = "model"
    """precision of the weights that sample: "bfloat16" decodes with a bf16 copy of the policy
    (lean decoder only) while training keeps the model's weights; the trainers then rescore the
    samples with the policy itself and weight each token's advantage by min(pi / pi_bf16,
    sampler_weight_cap) (truncated importance sampling)"""
    sampler_weight_cap: float = check(2.0, "> 0")
    """cap on the importance weight pi / pi_sampler of a token sampled with sample_dtype"""


@dataclass
class Rollout:
    """Prompts and sampled completions of one generation call. Rows follow the input order, each
    prompt repeated n times in a row (row i belongs to prompt i // n)."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 on prompt tokens
    completion_ids: torch.Tensor  # (B, T) right-padded
    completion_mask: torch.Tensor  # (B, T) 1 on completion tokens (EOS / stop token included)
    logp: (
        torch.Tensor
    )  # (B, T) log-prob of each sampled token under the sampling policy (0 on tool tokens)
    prompts: list[str]  # (B,) prompt text as the model saw it (chat template applied)
    completions: list[
        str
    ]  # (B,) decoded completion, special tokens removed, cut after a stop string
    prompt_index: torch.Tensor  # (B,) index of the prompt in the input list
    finish_reasons: list[str]  # (B,) "eos", "stop" or "length"
    n: int = 1
    seconds: float = 0.0
    tool_mask: torch.Tensor | None = None  # (B, T) 1 on tokens a tool inserted (None: no tools)
    tool_calls: list[list[ToolCall]] | None = None  # (B,) the calls each completion made
    exact_logp: bool = True  # False: logp is a lower-precision copy's (gen.sample_dtype)

    @property
    def policy_mask(self) -> torch.Tensor:
        """(B, T) 1 on the tokens the policy sampled: the completion less tool-inserted tokens.
        The mask of every loss, log-prob and KL; `completion_mask` is the attention mask."""
        if self.tool_mask is None:
            return self.completion_mask
        return self.completion_mask * (1 - self.tool_mask)

    def tool_records(self, i: int) -> list[dict[str, Any]]:
        """Row i's tool calls as JSON records (samples.jsonl, reports)."""
        return [c.as_dict() for c in self.tool_calls[i]] if self.tool_calls else []

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P + T) prompt and completion ids."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + T)."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def num_tokens(self) -> int:
        """Tokens the policy sampled (tool results left out)."""
        return int(self.policy_mask.sum())

    def __len__(self) -> int:
        return len(self.completions)


def render_prompts(
    tokenizer: Any, prompts: list[Prompt], cfg: GenerationConfig, tools: Toolbox | None = None
) -> list[str]:
    """Prompt texts: messages (or strings when cfg.chat) go through the chat template (with the
    tools' JSON schemas as `tools=` when the tools use the json call format)."""
    extra = {"tools": tools.schemas()} if tools is not None and tools.cfg.format == "json" else {}
    out = []
    for p in prompts:
        if isinstance(p, str) and not cfg.chat:
            out.append(p)
            continue
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        if cfg.system_prompt and msgs[0].get("role") != "system":
            msgs = [{"role": "system", "content": cfg.system_prompt}, *msgs]
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "this tokenizer has no chat template; use raw text prompts (gen.chat=false) "
                "or a chat model"
            )
        out.append(
            tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **extra)
        )
    return out


def encode_prompts(
    tokenizer: Any, texts: list[str], max_tokens: int, chat: bool
) -> list[list[int]]:
    """Token ids per prompt, keeping the last `max_tokens` (the end is where generation continues)."""
    # Chat-templated text already carries its special tokens.
    enc = tokenizer(texts, add_special_tokens=not chat)["input_ids"]
    return [ids[-max_tokens:] for ids in enc]


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = set()
    for src in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list):
            ids.update(src)
    return sorted(ids)


@dataclass
class _Decoded:
    ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) 1 on completion tokens
    logp: torch.Tensor  # (B, T) 0 on tool tokens and padding
    reasons: list[str]  # (B,)
    tool_mask: torch.Tensor  # (B, T) 1 on tool-inserted tokens
    calls: list[list[ToolCall]]  # (B,)


def _decode_loop(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cfg: GenerationConfig,
    eos_ids: list[int],
    pad_id: int,
    stopper: StopChecker,
    row_seeds: list[int] | None = None,
    groups: list[int] | None = None,
    tools: ToolRunner | None = None,
    lean: LeanDecoder | None = None,
    shared: SharedStart | None = None,
) -> _Decoded:
    """Decode up to max_new_tokens for a left-padded batch (no grad).
    With row_seeds (B,), row b samples from its own generator (`sampling.row_uniforms`). With groups (B,),
    rows of one group hold the same prompt: it is pre-filled once and its KV cache repeated.
    With tools, a row that closes a call reads the result's tokens, one per step, in place of
    sampling (no log-prob, marked in tool_mask); the other rows go on sampling meanwhile, so a
    row's tokens do not depend on the others'. shared: a system prompt's cache kept across the
    call's prefills (`forwards.SharedStart`)."""
    B = input_ids.shape[0]
    device = input_ids.device
    sampled = cfg.temperature > 0
    uniforms = None
    if sampled and row_seeds is not None:
        uniforms = row_uniforms(row_seeds, cfg.max_new_tokens).to(device)  # (B, max_new_tokens)
    eos = torch.tensor(eos_ids, device=device)
    past, attention_mask, logits, _ = _prefill(
        model, input_ids, attention_mask, groups or list(range(B)), expand=True, shared=shared
    )
    pos = position_ids_from_mask(attention_mask)[:, -1:]
    if lean is not None:
        lean.load(past, attention_mask, cfg.max_new_tokens)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    reasons = ["length"] * B
    ids_steps: list[torch.Tensor] = []
    logp_steps: list[torch.Tensor] = []
    mask_steps: list[torch.Tensor] = []
    tool_steps: list[torch.Tensor] = []
    history: list[list[int]] = [[] for _ in range(B)]
    keep_history = bool(stopper.stops) or tools is not None
    for step in range(cfg.max_new_tokens):
        u = uniforms[:, step] if uniforms is not None else None
        nxt, logp_all = _draw(logits, cfg, u)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        is_tool = torch.zeros(B, dtype=torch.bool, device=device)
        fed: list[int] = []  # rows that read a tool result's token this step
        if tools is not None and any(tools.queue):
            done_rows = done.tolist()
            fed = [i for i in range(B) if tools.queue[i] and not done_rows[i]]
            if fed:
                rows = torch.tensor(fed, device=device)
                nxt[rows] = torch.tensor([tools.queue[i].pop(0) for i in fed], device=device)
                is_tool[rows] = True
        ids_steps.append(nxt)
        logp_tok = logp_all.gather(-1, nxt[:, None]).squeeze(-1)
        logp_steps.append(torch.where(done | is_tool, 0.0, logp_tok))
        mask_steps.append((~done).float())
        tool_steps.append(is_tool.float())
        newly_eos = torch.isin(nxt, eos) & ~done & ~is_tool
        for i in newly_eos.nonzero().flatten().tolist():
            reasons[i] = "eos"
        done = done | newly_eos
        if keep_history:
            tool_rows = set(fed)
            tokens = nxt.tolist()
            for i in (~done).nonzero().flatten().tolist():
                history[i].append(tokens[i])
                if tools is not None and i not in tool_rows:
                    tools.after_sampled(i, history[i])
                if stopper.stops and i not in tool_rows and not (tools and tools.queue[i]):
                    if stopper.hit(history[i]):
                        done[i] = True
                        reasons[i] = "stop"
        if bool(done.all()) or step == cfg.max_new_tokens - 1:
            break
        pos = pos + 1
        if lean is not None:
            logits = lean.step(nxt, pos)
            continue
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        out = model(
            input_ids=nxt[:, None],
            attention_mask=attention_mask,
            position_ids=pos,
            cache=past,
            use_cache=True,
        )
        past = out.cache
        logits = out.logits[:, -1].float()
    return _Decoded(
        torch.stack(ids_steps, 1),
        torch.stack(mask_steps, 1),
        torch.stack(logp_steps, 1),
        reasons,
        torch.stack(tool_steps, 1),
        tools.calls if tools is not None else [[] for _ in range(B)],
    )


def _prefill(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    groups: list[int],
    *,
    expand: bool,
    shared: SharedStart | None = None,
) -> tuple[Any, torch.Tensor, torch.Tensor, list[int]]:
    """Prefill left-padded prompts ids, mask (B, P), each distinct prompt (the n samples of a
    prompt are one group) once, and a start common to all of them (a system prompt) once
    (`prompt_pass`; with `shared`, once per generate call) -> (the cache, its attention mask (G, K), the last position's logits (G, V)
    in fp32, the index of each row's prompt in them (B,)). expand: the cache, mask and logits
    repeated to the B rows (the index is then 0..B-1)."""
    B = len(groups)
    uniq, inv = torch.unique(torch.tensor(groups), return_inverse=True)
    if len(uniq) == B:  # nothing shared: every row in its own order
        first, inv = torch.arange(B), torch.arange(B)
    else:  # the first row of each group
        first = torch.zeros(len(uniq), dtype=torch.long).scatter_(0, inv, torch.arange(B))
    device = ids.device
    out, mask = prompt_pass(model, ids[first.to(device)], mask[first.to(device)], start=shared)
    cache, logits = out.cache, out.logits[:, -1].float()
    if expand and len(uniq) < B:
        inv = inv.to(device)
        cache.batch_select_indices(inv)
        logits, mask = logits[inv], mask[inv]  # (B, V), (B, K)
        inv = torch.arange(B)
    return cache, mask, logits, inv.tolist()


def _draw(
    logits: torch.Tensor, cfg: GenerationConfig, u: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row from its logits (B, V) -> (tokens (B,), log_softmax of the
    logits at the sampling temperature (B, V): greedy at temperature 0 (temperature 1 for the
    log-probs), otherwise the inverse-CDF draw of the top-k/top-p distribution with uniforms u
    (B,) (None: torch's global RNG draws them)."""
    sampled = cfg.temperature > 0
    temp = cfg.temperature if sampled else 1.0
    scaled = logits / temp if temp != 1.0 else logits
    logp_all = torch.log_softmax(scaled, dim=-1)  # (B, V)
    if not sampled:
        return scaled.argmax(-1), logp_all
    if cfg.top_k > 0 or cfg.top_p < 1.0:
        probs = torch.softmax(filter_logits(scaled, cfg.top_k, cfg.top_p), dim=-1)
    else:  # no truncation: the sampling distribution is exp(logp_all)
        probs = logp_all.exp()
    # torch.multinomial took about 1 ms a row per step over a 49k vocabulary on a CPU
    if u is None:
        u = torch.rand(logits.shape[0], dtype=torch.float64)
    return inverse_cdf(probs, u.to(logits.device)), logp_all


def _stream_decode(
    model: Any,
    lean: LeanDecoder,
    row_ids: list[list[int]],
    order: list[int],
    slots: int,
    cfg: GenerationConfig,
    eos_ids: list[int],
    pad_id: int,
    stopper: StopChecker,
    row_seeds: list[int] | None,
    groups: list[int],
    on_done: Any = None,
    shared: SharedStart | None = None,
) -> dict[int, tuple]:
    """Decode rows `order` (indices into row_ids) through `slots` rows of the lean decoder,
    continuously: a row that ends frees its slot, and once a quarter of the slots are free the
    next rows in `order` are prefilled into them, so steps carry nearly full batches until the
    rows run out (decoding micro-batch after micro-batch instead runs each until its longest row
    ends, its finished rows idle).

    A row's tokens do not depend on which slot or step it decodes in: with row_seeds it draws
    its i-th token from the i-th uniform of its own generator, and its attention sees its own
    prompt and tokens only (`LeanDecoder.place`). Returns {row: (ids (T,), mask (T,), logp (T,),
    finish reason, tool mask (T,), calls)} as `generate` collects them."""
    device = next(model.parameters()).device
    new = cfg.max_new_tokens
    eos = set(eos_ids)
    queue = list(reversed(order))  # pop() takes the next row
    S = min(slots, len(order))
    refill_at = max(1, S // 4)  # free slots that trigger a refill
    uniforms = {}
    if cfg.temperature > 0 and row_seeds is not None:
        u = row_uniforms([row_seeds[i] for i in order], new)  # (rows, new)
        uniforms = {r: u[j] for j, r in enumerate(order)}
    # the first S rows: one prefill, the cache taken over with room for the rows that follow
    # (the longest prompt and its tokens, plus slack so that old columns are dropped rarely)
    first_rows = [queue.pop() for _ in range(S)]
    longest = max(len(row_ids[i]) for i in order)
    ids, mask = _pad_left([row_ids[i] for i in first_rows], pad_id)
    first_groups = [groups[i] for i in first_rows]
    cache, mask, logits, _ = _prefill(
        model, ids.to(device), mask.to(device), first_groups, expand=True, shared=shared
    )  # (S, K), (S, V)
    K = mask.shape[1]
    lean.load(cache, mask, max(longest, K) - K + new + max(16, new // 4))
    del cache
    slot_row: list[int | None] = list(first_rows)
    start = mask.long().argmax(1).tolist()  # each slot's first attended column
    pos = position_ids_from_mask(mask)[:, -1:].clone()  # (S, 1) position of each slot's last token
    toks: list[list[int]] = [[] for _ in range(S)]
    lps: list[list[float]] = [[] for _ in range(S)]
    results: dict[int, tuple] = {}
    while any(r is not None for r in slot_row):
        u = None
        if uniforms:  # each row's next uniform (idle slots draw anything)
            u = torch.tensor([
                float(uniforms[r][len(toks[s])]) if r is not None else 0.5
                for s, r in enumerate(slot_row)
            ], dtype=torch.float64)  # fmt: skip
        nxt, logp_all = _draw(logits, cfg, u)
        tokens = nxt.tolist()
        lp = logp_all.gather(-1, nxt[:, None]).squeeze(-1).tolist()
        for s, r in enumerate(slot_row):
            if r is None:
                continue
            toks[s].append(tokens[s])
            lps[s].append(lp[s])
            reason = None
            if tokens[s] in eos:
                reason = "eos"
            elif stopper.stops and stopper.hit(toks[s]):
                reason = "stop"
            elif len(toks[s]) == new:
                reason = "length"
            if reason is not None:
                n = len(toks[s])
                results[r] = (
                    row_ids[r], torch.tensor(toks[s]), torch.ones(n), torch.tensor(lps[s]),
                    reason, torch.zeros(n), [],
                )  # fmt: skip
                slot_row[s] = None
                if on_done is not None:
                    on_done()
        free = [s for s, r in enumerate(slot_row) if r is None]
        if len(free) == S and not queue:
            break
        if len(free) < S:  # the rows still going read their tokens
            if lean.length == lean.capacity:
                cut = min(start[s] for s, r in enumerate(slot_row) if r is not None)
                lean.compact(cut)
                start = [x - cut for x in start]
            pos = pos + 1
            nxt = torch.where(
                torch.tensor([r is None for r in slot_row], device=device), pad_id, nxt
            )
            logits = lean.step(nxt, pos)
        # refill the free slots with the next rows, a quarter of the slots at a time: one
        # prefill per freed slot would read every weight once per row (a one-row prefill costs
        # more than a decode step), and rows that end together stay together
        if free and queue and len(free) >= min(refill_at, len(queue)):
            rows = [queue.pop() for _ in range(min(len(free), len(queue)))]
            ids, mask = _pad_left([row_ids[i] for i in rows], pad_id)
            gs = [groups[i] for i in rows]
            cache, mask, new_logits, index = _prefill(
                model, ids.to(device), mask.to(device), gs, expand=False, shared=shared
            )
            last = position_ids_from_mask(mask)[:, -1]  # (G,)
            for s, r, g in zip(free, rows, index):
                lean.place(s, cache, g, mask[g])
                slot_row[s] = r
                toks[s], lps[s] = [], []
                start[s] = lean.length - int(mask[g].sum())
                pos[s, 0] = last[g]
                logits[s] = new_logits[g]
    return results


def _pad_left(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids, mask


def _pad_right(t: torch.Tensor, width: int, value: float) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    pad = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)


def _decode(tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, stops: list[str]) -> str:
    text = tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
    cut = [text.find(s) + len(s) for s in stops if s and s in text]
    return text[: min(cut)] if cut else text


def _micro_batches(lengths: list[int], cfg: GenerationConfig) -> list[list[int]]:
    """Row indices grouped into micro-batches, longest prompts first, within the token budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = (lengths[cur[0]] if cur else lengths[i]) + cfg.max_new_tokens
        if cur and ((len(cur) + 1) * width > cfg.token_budget or len(cur) >= cfg.max_batch_size):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    cfg: GenerationConfig | None = None,
    *,
    progress: bool = False,
    batch_size: int | None = None,
    seeds: list[int] | None = None,
    tools: Toolbox | None = None,
) -> Rollout:
    """Sample cfg.n completions for every prompt, batched. Returns rows in input order.

    seeds: one per prompt; sample j of prompt i then draws from a generator seeded with
    mix_seed(seeds[i], j), whatever else is in the batch (None: torch's global RNG).
    tools: the model may call them while it generates (`posttrain.tools`); the Rollout's
    tool_mask marks the result tokens and tool_calls lists the calls.
    """
    cfg = cfg or GenerationConfig()
    if not prompts:
        raise ValueError("generate() got no prompts")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"generate() got {len(seeds)} seeds for {len(prompts)} prompts")
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    texts = render_prompts(tokenizer, prompts, cfg, tools)
    chat = cfg.chat or not isinstance(prompts[0], str)
    enc = encode_prompts(tokenizer, texts, cfg.max_prompt_tokens, chat)
    rows = [i for i in range(len(prompts)) for _ in range(cfg.n)]  # prompt index per row
    row_seeds = (
        [mix_seed(seeds[i], j) for i in range(len(prompts)) for j in range(cfg.n)]
        if seeds is not None
        else None
    )
    row_ids = [enc[i] for i in rows]
    batches = (
        [list(range(s, min(s + batch_size, len(rows)))) for s in range(0, len(rows), batch_size)]
        if batch_size
        else _micro_batches([len(r) for r in row_ids], cfg)
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = eos_token_ids(model, tokenizer)
    stopper = StopChecker(tokenizer, cfg.stop)
    results: dict[int, tuple] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc="generate", unit="seq", dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        lean = _lean_decoder(model, cfg, max(len(b) for b in batches))
        # the model's forward runs the prefill (and the decode steps without the lean decoder)
        kernels = cpu.packed_linears(model) if lean is None else contextlib.nullcontext()
        # more rows than one micro-batch, lean decoder, no tools: one continuous batch
        stream = cfg.continuous_batching and lean is not None and tools is None
        stream = stream and len(batches) > 1
        # a system prompt common to the prompts runs once for the whole call, not per prefill
        shared = SharedStart()
        with torch.no_grad(), kernels:
            if stream:
                width = max(len(r) for r in row_ids) + cfg.max_new_tokens
                slots = batch_size or min(
                    max(len(b) for b in batches), max(1, cfg.token_budget // width)
                )
                results = _stream_decode(
                    model, lean, row_ids, [i for b in batches for i in b], slots, cfg, eos_ids,
                    pad, stopper, row_seeds, rows, on_done=bar.update if bar is not None else None,
                    shared=shared,
                )  # fmt: skip
            for batch in [] if stream else batches:
                p_ids, p_mask = _pad_left([row_ids[i] for i in batch], pad)
                dec = _decode_loop(
                    model,
                    p_ids.to(device),
                    p_mask.to(device),
                    cfg,
                    eos_ids,
                    pad,
                    stopper,
                    [row_seeds[i] for i in batch] if row_seeds is not None else None,
                    [rows[i] for i in batch],
                    ToolRunner(tools, tokenizer, len(batch)) if tools is not None else None,
                    lean,
                    shared,
                )
                for j, i in enumerate(batch):
                    results[i] = (
                        row_ids[i],
                        dec.ids[j].cpu(),
                        dec.mask[j].cpu(),
                        dec.logp[j].cpu(),
                        dec.reasons[j],
                        dec.tool_mask[j].cpu(),
                        dec.calls[j],
                    )
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    prompt_ids, prompt_mask = _pad_left([results[i][0] for i in range(len(rows))], pad)
    T = max(results[i][1].shape[0] for i in range(len(rows)))
    comp_ids = torch.stack([_pad_right(results[i][1][None], T, pad)[0] for i in range(len(rows))])
    comp_mask = torch.stack([_pad_right(results[i][2][None], T, 0.0)[0] for i in range(len(rows))])
    logp = torch.stack([_pad_right(results[i][3][None], T, 0.0)[0] for i in range(len(rows))])
    tool_mask = torch.stack([_pad_right(results[i][5][None], T, 0.0)[0] for i in range(len(rows))])
    completions = [
        _decode(tokenizer, comp_ids[i], comp_mask[i], cfg.stop) for i in range(len(rows))
    ]
    return Rollout(
        prompt_ids=prompt_ids.to(device),
        prompt_mask=prompt_mask.to(device),
        completion_ids=comp_ids.to(device),
        completion_mask=comp_mask.to(device),
        logp=logp.to(device),
        prompts=[texts[i] for i in rows],
        completions=completions,
        prompt_index=torch.tensor(rows, device=device),
        finish_reasons=[results[i][4] for i in range(len(rows))],
        n=cfg.n,
        seconds=time.perf_counter() - t0,
        tool_mask=tool_mask.to(device) if tools is not None else None,
        tool_calls=[results[i][6] for i in range(len(rows))] if tools is not None else None,
        exact_logp=cfg.sample_dtype == "model",
    )


def _lean_decoder(model: Any, cfg: GenerationConfig, rows: int) -> LeanDecoder | None:
    """The lean decoder for this call (None: decode through the model's forward)."""
    dtype = torch.bfloat16 if cfg.sample_dtype == "bfloat16" else None
    lean = LeanDecoder.build(model, dtype, rows) if cfg.lean_decoder else None
    if lean is None and dtype is not None:
        raise ValueError(
            "gen.sample_dtype=bfloat16 needs the lean decoder, which applies to "
            f"{'/'.join(SUPPORTED)}-architecture models on the CPU with gen.lean_decoder=true; "
            "this model samples through its own forward: set gen.sample_dtype=model"
        )
    return lean


def generate_sequential(
    model: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    cfg: GenerationConfig | None = None,
    tools: Toolbox | None = None,
) -> Rollout:
    """The plain generator: one row at a time, no padding. Same output format as `generate`."""
    return generate(model, tokenizer, prompts, cfg, batch_size=1, tools=tools)
