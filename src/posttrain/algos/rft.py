"""Rejection-sampling fine-tuning (RFT; Yuan et al. 2023, https://arxiv.org/abs/2308.01825).

For every training question, sample k reasoning paths with the task's chain-of-thought prompt at
temperature > 0; keep the paths the task verifier marks correct (reward >= threshold); drop
duplicate paths (same text after lower-casing and collapsing whitespace); drop questions with no
correct path. The kept records (question, answer, reasoning) and their statistics go to
rft_data_<iteration>.json in the run directory. Then a LoRA adapter is trained with `offline.fit` on
"question -> reasoning <answer>x</answer>" text (no chat template, the `direct` prompt).

    posttrain rft --config configs/rft_unit_conversion.toml

Departures from the paper: the paper deduplicates paths by their list of equations and samples
from SFT models; here paths are compared as normalised text and sampled from the prompted model.
`mode = "best_of_n"` keeps the `best_of` highest-reward distinct samples of each question under
any reward (no verifier needed). `iterations > 1` samples again with the fine-tuned model (prompted
in its own training format), adds the new distinct paths, and trains the same adapter further with
a fresh optimizer each time.

Tools (`[tools]`, `--tool calculator`): the samples may call them; a kept path holds its calls and
their results, and the SFT on kept paths gives the results no loss (`data.tool_labels`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from posttrain.algos.sft import sft_step_loss
from posttrain.config import ConfigError, LoraConfig, ModelConfig, OptimConfig, RunConfig, check
from posttrain.data import DataConfig, encode_rows, fill, with_question
from posttrain.offline import TrainConfig, finish, fit, supervised, test_eval, trained_format
from posttrain.rollout import GenerationConfig
from posttrain.tasks.base import TaskConfig, columns
from posttrain.tools import Toolbox, ToolConfig, calls_in
from posttrain.train import uses_run_settings

# gen(prompts, cfg) -> cfg.n completions per prompt, contiguous (posttrain.prompting.Generator)
Generator = Callable[[list[Any], GenerationConfig], list[str]]


def _gen() -> GenerationConfig:
    return GenerationConfig(temperature=0.7, max_new_tokens=96, stop=["</answer>"])


def _lora() -> LoraConfig:
    # r=16 on every linear layer of SmolLM2-135M is ~20 MB (an RFT adapter may take up to 50 MB)
    return LoraConfig(enabled=True, r=16, alpha=64)


def _optim() -> OptimConfig:
    return OptimConfig(lr=5e-4, warmup_steps=10, schedule="cosine")


@dataclass
class Config:
    ALIASES: ClassVar[dict[str, str]] = {
        "model": "model.name",
        "resume": "run.resume",
        "tool": "tools.names",
    }
    k: int = check(10, ">= 1")
    """completions sampled per question"""
    mode: Literal["verifier", "best_of_n"] = "verifier"
    """verifier: keep samples with reward >= threshold; best_of_n: keep the best_of highest"""
    threshold: float = 1.0
    """verifier mode: the reward a correct sample reaches"""
    best_of: int = check(1, ">= 1")
    """best_of_n mode: distinct samples kept per question"""
    max_per_question: int = check(0, ">= 0")
    """verifier mode: keep at most this many distinct correct paths per question (0: all)"""
    questions: int = check(0, ">= 0")
    """sample for only the first N training questions (0: all)"""
    iterations: int = check(1, ">= 1")
    """rounds of sample -> train; later rounds sample from the fine-tuned model"""
    prompt_template: str = "{question} "
    """training prompt built from a record (the `direct` prompt: raw question, no chat template)"""
    completion_template: str = "{reasoning}"
    """training completion built from a record; EOS is appended"""
    max_length: int = check(256, ">= 1")
    """training examples longer than this many tokens are cut at the end"""
    eval_limit: int = check(200, ">= 0")
    """after training, greedy accuracy on this many test rows (0: off)"""
    eval_max_new_tokens: int = check(96, ">= 1")
    """tokens generated per test question for that accuracy"""
    output: str | None = None
    """also copy the final hub-ready folder here"""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=_lora)
    optim: OptimConfig = field(default_factory=_optim)
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    gen: GenerationConfig = field(default_factory=_gen)
    train: TrainConfig = field(default_factory=TrainConfig)
    tools: ToolConfig = field(default_factory=ToolConfig)

    def validate(self) -> None:
        if self.gen.temperature <= 0 and self.k > 1:
            raise ConfigError(
                "gen.temperature is 0 (greedy): all k samples would be the same; use 0.5-1.0"
            )


# ---------------------------------------------------------------------------------------------
# Filtering and deduplication (pure)


def normalise(text: str) -> str:
    """The key two reasoning paths are compared by: lower case, whitespace collapsed."""
    return " ".join(text.lower().split()).rstrip(" .")


def reasoning_of(completion: str) -> str:
    """The completion up to and including its first </answer>, stripped."""
    end = completion.find("</answer>")
    return (completion[: end + len("</answer>")] if end >= 0 else completion).strip()


def select(
    rows: list[dict[str, Any]],
    completions: list[str],
    rewards: torch.Tensor,
    *,
    k: int,
    mode: str = "verifier",
    threshold: float = 1.0,
    best_of: int = 1,
    max_per_question: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Keep correct (or best) distinct samples per question -> (records, statistics).

    completions and rewards hold k samples per row, contiguous (row i owns i*k .. i*k+k-1).
    """
    if len(completions) != len(rows) * k or rewards.shape[0] != len(completions):
        raise ValueError(
            f"expected {len(rows) * k} completions and rewards, got {len(completions)}"
        )
    records: list[dict[str, Any]] = []
    kept_q = correct = 0
    for i, row in enumerate(rows):
        cands = [
            (reasoning_of(completions[i * k + j]), float(rewards[i * k + j])) for j in range(k)
        ]
        if mode == "verifier":
            good = [c for c in cands if c[1] >= threshold]
            correct += len(good)
            limit = max_per_question
        else:
            good = sorted(cands, key=lambda c: -c[1])  # stable: ties keep sampling order
            limit = best_of
        seen: set[str] = set()
        mine = []
        for text, r in good:
            key = normalise(text)
            if not key or key in seen:
                continue
            seen.add(key)
            mine.append(
                {
                    "question": row["question"],
                    "answer": row.get("answer"),
                    "reasoning": text,
                    "reward": r,
                }
            )
            if limit and len(mine) >= limit:
                break
        kept_q += bool(mine)
        records += mine
    n = max(len(rows), 1)
    stats = {
        "questions": len(rows),
        "samples": len(completions),
        "questions_kept": kept_q,
        "share_questions_kept": kept_q / n,
        "records": len(records),
        "records_per_kept_question": len(records) / max(kept_q, 1),
        "mean_reward": float(rewards.float().mean()) if len(completions) else 0.0,
    }
    if mode == "verifier":
        stats["share_samples_correct"] = correct / max(len(completions), 1)
    return records, stats


def sample_records(
    gen: Generator,
    task: Any,
    rows: list[dict[str, Any]],
    prompts: list[Any],
    gen_cfg: GenerationConfig,
    cfg: Config,
    raw: list[dict[str, Any]] | None = None,
    tools: Toolbox | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Sample cfg.k completions per prompt, score them with the task's reward, select.

    `raw`, when given, receives every sample as {question, completion, reward}, and with `tools`
    (those `gen` samples with) the calls each completion made as "tool_calls"."""
    import dataclasses

    gen_cfg = dataclasses.replace(gen_cfg, n=cfg.k)
    completions = gen(prompts, gen_cfg)
    batch = columns([r for r in rows for _ in range(cfg.k)])
    questions = [str(r.get("question", "")) for r in rows for _ in range(cfg.k)]
    rewards = torch.as_tensor(task.reward(questions, completions, batch), dtype=torch.float32)
    if raw is not None:
        raw += [
            {"question": q, "completion": c, "reward": float(r)}
            for q, c, r in zip(questions, completions, rewards)
        ]
        if tools is not None:
            for rec in raw[-len(completions) :]:
                rec["tool_calls"] = [call.as_dict() for call in calls_in(rec["completion"], tools)]
    return select(
        rows,
        completions,
        rewards,
        k=cfg.k,
        mode=cfg.mode,
        threshold=cfg.threshold,
        best_of=cfg.best_of,
        max_per_question=cfg.max_per_question,
    )


# ---------------------------------------------------------------------------------------------


@uses_run_settings
def main(cfg: Config) -> int:
    from posttrain.prompting import model_generator
    from posttrain.tasks import load_task
    from posttrain.train import load_policy, start

    acc, run = start(cfg, "rft")
    model, tok = load_policy(cfg.model, cfg.lora, acc.device, onednn=cfg.run.onednn)
    task = load_task(cfg.task)
    tools = Toolbox.from_config(cfg.tools)
    rows = [with_question(r) for r in task.rows("train")]  # sentiment: the opening is the question
    rows = rows[: cfg.questions] if cfg.questions else rows
    data_cfg = DataConfig(
        format="template",
        prompt_template=cfg.prompt_template,
        completion_template=cfg.completion_template,
        max_length=cfg.max_length,
    )
    last = run.latest_checkpoint() if cfg.run.resume else None
    last_step = int(last.name.split("_")[1]) if last else 0
    records: list[dict[str, Any]] = []
    keys: set[tuple[str, str]] = set()
    summary: dict[str, Any] = {}
    offset = 0
    for it in range(cfg.iterations):
        path = run.path / f"rft_data_{it}.json"
        if cfg.run.resume and path.is_file():  # sampled before the interruption
            new = json.loads(path.read_text())["records"]
        else:
            # round 0: the task's (chain-of-thought) prompt; later: the model's training format
            prompts = (
                [r["prompt"] for r in rows]
                if it == 0
                else [fill(cfg.prompt_template, r) for r in rows]
            )
            gen = model_generator(
                acc.unwrap_model(model), tok, progress=cfg.run.progress, tools=tools
            )
            raw: list[dict[str, Any]] = []
            new, stats = sample_records(gen, task, rows, prompts, cfg.gen, cfg, raw, tools)
            run.write_json(path.name, {"stats": stats, "records": new})
            run.samples(offset, raw[: 8 * cfg.k])  # the first questions' samples, for a look
            run.log(offset, {f"rft/{k}": v for k, v in stats.items()} | {"iteration": it})
            summary[f"sampling_{it}"] = stats
        for r in new:
            key = (r["question"], normalise(r["reasoning"]))
            if key not in keys:
                keys.add(key)
                records.append(r)
        if not records:
            raise ConfigError(
                "no sample passed the filter, so there is nothing to train on; raise k or "
                "gen.temperature, check the prompt, or use mode=best_of_n"
            )
        train_set = encode_rows(records, tok, data_cfg, "template", tools)
        t = cfg.train  # each round trains the same adapter further, with a fresh optimizer
        out = fit(acc, run, model, train_set, supervised(acc.device, tok.pad_token_id, sft_step_loss),
                  cfg.optim, batch_size=t.batch_size, epochs=t.epochs, max_steps=t.max_steps,
                  resume=last_step > offset, step_offset=offset)  # fmt: skip
        model = acc.unwrap_model(out.model)
        offset = out.total
        summary.update(train_loss=out.last.get("loss"), steps=offset, records=len(records))
        if out.interrupted:
            print(f"stopped; resume with --run.resume {run.path}", flush=True)
            return 130
    if cfg.eval_limit:
        test_eval(run, model, tok, cfg, cfg.prompt_template, summary)
    trained = trained_format("rft", data_cfg, "template", cfg.task, cfg.tools)
    finish(run, model, tok, cfg, summary, trained)
    run.close()
    return 0
