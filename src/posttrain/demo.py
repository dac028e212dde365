"""`posttrain demo` (`make demo`): what post-training does, on the embedded default, on a CPU in
minutes.

The task is unit conversion at its standard level: any units of eight dimensions, decimal values,
temperatures. SmolLM2-135M-Instruct knows many conversion facts ("1 mile = 1609.344 meters") but
cannot multiply decimals, so every prompting strategy scores about 0 here. The fix the field uses
is a tool inside the rollout: the model writes `<calc>4.2 * 1609.344</calc>` and a calculator
inserts ` = 6759.2448` (`posttrain.tools`).

1. baseline: the base model on standard-level test questions with the strongest prompts: three
   worked examples (few-shot, nearest train questions), and the same with worked examples that
   call the calculator, the calculator on;
2. SFT: a LoRA adapter on generated worked solutions that state the factor as a fact and do the
   arithmetic with a calculator call (train questions in varied wordings, none from the test);
   the calculator's results are masked out of the loss;
3. after: the adapter answers the same test questions, asked directly (the raw question, no
   examples), with the calculator;
4. an HTML report: the before/after table, the curves and transcripts with their tool calls.

    posttrain demo                                   # about 9 minutes on 2 CPU cores
    posttrain demo --examples=3000 --eval_limit=200  # the recipe's size (configs/sft_unit_conversion_tools.toml)
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.config import ModelConfig, RunConfig, check
from posttrain.train import uses_run_settings


@dataclass
class Config:
    examples: int = check(768, ">= 1")
    """generated worked solutions (with calculator calls) the adapter is trained on, one epoch"""
    eval_limit: int = check(100, ">= 1")
    """standard-level test questions evaluated before and after"""
    batch_size: int = check(32, ">= 1")
    """examples per optimizer step"""
    lr: float = check(2e-3, "> 0")
    """learning rate (LoRA r=32 on every linear layer; constant after 5 warm-up steps: a short run learns more at full rate than on a decaying one)"""
    model: str = "default"
    """the model to post-train"""
    run: RunConfig = field(default_factory=RunConfig)


@uses_run_settings
def main(cfg: Config) -> int:
    from posttrain.algos import sft
    from posttrain.evaluate import evaluate
    from posttrain.models import load_model
    from posttrain.report import build_report
    from posttrain.runs import Run
    from posttrain.tasks import TaskConfig, load_task
    from posttrain.tools import Toolbox, ToolConfig

    t0 = time.perf_counter()
    name = cfg.run.name or f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    print(
        "posttrain demo: unit conversion (standard level) with the embedded SmolLM2-135M-Instruct,"
        " before and after SFT with a calculator\n",
        flush=True,
    )
    tool_cfg = ToolConfig(names=["calculator"])
    tools = Toolbox.from_config(tool_cfg)

    # 1. baseline: the strongest prompts, greedy, with and without the calculator
    task_cfg = TaskConfig(name="unit_conversion", difficulty="standard", strategy="few_shot")
    print(f"[1/4] baseline on {cfg.eval_limit} standard-level test questions", flush=True)
    model, tok = load_model(cfg.model, onednn=cfg.run.onednn)
    task = load_task(task_cfg)
    before: dict[str, float] = {}
    before_rows: list[dict] = []
    for label, box in (("few_shot", None), ("few_shot+calculator", tools)):
        summary, rows = evaluate(
            model,
            tok,
            task,
            strategy="few_shot",
            split="test",
            limit=cfg.eval_limit,
            max_new_tokens=128,
            batch_size=64,  # fewer, fuller decoding batches
            progress=cfg.run.progress,
            desc=f"baseline {label}",
            tools=box,
        )
        before.update({f"{label}/{k}": v for k, v in summary.items()})
        before_rows += [{**r, "strategy": label} for r in rows[:3]]
        print(
            f"      {label:<20} accuracy {summary['accuracy']:.3f}, "
            f"answer rate {summary['answer_rate']:.3f}",
            flush=True,
        )
    del model
    best_key = max(("few_shot", "few_shot+calculator"), key=lambda k: before[f"{k}/accuracy"])

    # 2. SFT on worked solutions that call the calculator
    print(
        f"\n[2/4] SFT: LoRA on {cfg.examples} generated worked solutions with calculator calls",
        flush=True,
    )
    scfg = sft.Config()
    scfg.model.name = cfg.model
    scfg.lora = dataclasses.replace(scfg.lora, enabled=True, r=32, alpha=64)
    scfg.optim = dataclasses.replace(
        scfg.optim, lr=cfg.lr, warmup_steps=5, schedule="constant", max_grad_norm=1.0
    )
    scfg.task = dataclasses.replace(
        task_cfg, strategy="direct", train_phrasing="varied", train_size=cfg.examples
    )
    scfg.data = dataclasses.replace(
        scfg.data,
        prompt_template="{question} ",
        completion_template="{tool_solution}",
        max_length=144,
        validation_size=0.02,
    )
    scfg.train = dataclasses.replace(scfg.train, epochs=1, batch_size=cfg.batch_size, eval_every=0)
    scfg.tools = tool_cfg
    scfg.eval_limit = cfg.eval_limit
    scfg.eval_max_new_tokens = 128
    scfg.run = dataclasses.replace(cfg.run, name=name, save_every=0, sample_every=0)
    sft.main(scfg)
    run_dir = Path(cfg.run.out_dir) / name
    if not run_dir.is_dir():  # Run.start picks a fresh name when one exists
        run_dir = sorted(Path(cfg.run.out_dir).glob(name + "*"), key=lambda p: p.stat().st_mtime)[
            -1
        ]
    results = json.loads((run_dir / "results.json").read_text())
    after = {f"direct+calculator/{k}": v for k, v in results["test"].items()}

    # 3. before / after on the same questions, with transcripts of the adapter's tool calls
    print("\n[3/4] before / after on the same test questions", flush=True)
    trained = ModelConfig(name=cfg.model, adapter=str(run_dir / "final"))
    model, tok = load_model(trained, onednn=cfg.run.onednn)
    _, after_rows = evaluate(
        model, tok, load_task(scfg.task), strategy="direct", split="test", limit=6,
        max_new_tokens=128, tools=tools,
    )  # fmt: skip

    # the report compares keys present on both sides: the best prompt's metrics before, the
    # trained model's after, under the same names; each baseline's headline numbers beside them
    def metrics(summary: dict[str, float], prefix: str) -> dict[str, float]:
        return {
            k[len(prefix) + 1 :]: v
            for k, v in summary.items()
            if k.startswith(prefix + "/") and k.split("/")[1] in ("accuracy", "answer_rate")
        }

    headline = {
        f"{label}/{m}": before[f"{label}/{m}"]
        for label in ("few_shot", "few_shot+calculator")
        for m in ("accuracy", "answer_rate")
    }
    run = Run(run_dir, cfg.run)
    run.write_json(
        "eval_before.json",
        {"summary": {**metrics(before, best_key), **headline}, "best_prompt": best_key,
         "examples": before_rows},
    )  # fmt: skip
    after_examples = [{**r, "strategy": "direct+calculator"} for r in after_rows]
    run.write_json(
        "eval_after.json",
        {"summary": metrics(after, "direct+calculator"), "examples": after_examples},
    )
    best = before[f"{best_key}/accuracy"]
    acc = after["direct+calculator/accuracy"]
    for key in ("few_shot", "few_shot+calculator"):
        print(
            f"      before  {key:<20} accuracy {before[f'{key}/accuracy']:.3f}, "
            f"answer rate {before[f'{key}/answer_rate']:.3f}",
            flush=True,
        )
    print(
        f"      after   {'direct+calculator':<20} accuracy {acc:.3f}, "
        f"answer rate {after['direct+calculator/answer_rate']:.3f}   "
        f"({acc - best:+.3f} over the best prompt)",
        flush=True,
    )
    for r in after_rows[:2]:
        print(f"\n      Q: {r['prompt'].strip()}\n      A: {r['completion'].strip()}", flush=True)

    print("\n[4/4] report", flush=True)
    report = build_report(run_dir)
    minutes = (time.perf_counter() - t0) / 60
    print(f"\ndone in {minutes:.1f} min. Open the report: {report}", flush=True)
    return 0
