"""`posttrain demo` (`make demo`): the whole story on the embedded default, on a CPU in minutes.

1. baseline: SmolLM2-135M-Instruct on unit-conversion test questions (the easy level: integer
   factors), asked directly ("{question} " -> answer) and with few-shot worked examples;
2. RFT (Yuan et al. 2023): sample k reasoning paths per training question, prompted with the 3
   most similar other train questions as worked examples; keep the correct ones; LoRA fine-tune
   on "question -> reasoning <answer>x</answer>";
3. the fine-tuned adapter answers the same test questions directly, with no examples;
4. an HTML report with the curves, the before/after table and sample generations.

    posttrain demo                                  # sized for about 10 minutes on 2 CPU cores
    posttrain demo --questions=200 --k=8 --eval_limit=200

The standard level of the task (any units, decimals, temperatures) is beyond a 135M model: every
prompting strategy scores about 0 there, so there is nothing for rejection sampling to keep.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.config import RunConfig, check


@dataclass
class Config:
    questions: int = check(96, ">= 1")
    """training questions RFT samples reasoning paths for"""
    k: int = check(4, ">= 1")
    """samples per training question"""
    eval_limit: int = check(50, ">= 0")
    """test questions evaluated before and after"""
    epochs: int = check(3, ">= 1")
    """RFT training epochs over the kept reasoning paths"""
    model: str = "default"
    """the model to post-train"""
    run: RunConfig = field(default_factory=RunConfig)


def main(cfg: Config) -> int:
    from posttrain.algos import rft
    from posttrain.evaluate import evaluate
    from posttrain.models import load_model
    from posttrain.report import build_report
    from posttrain.runs import Run
    from posttrain.tasks import TaskConfig, load_task

    t0 = time.perf_counter()
    name = cfg.run.name or f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    print(
        "posttrain demo: RFT on unit conversion with the embedded SmolLM2-135M-Instruct\n",
        flush=True,
    )

    # 1. baseline: the base model asked directly (the prompt the fine-tuned model gets) and with
    #    few-shot worked examples (the strongest prompting baseline here), greedy
    task_cfg = TaskConfig(name="unit_conversion", difficulty="easy", strategy="few_shot")
    print(f"[1/4] baseline on {cfg.eval_limit} test questions", flush=True)
    model, tok = load_model(cfg.model)
    task = load_task(task_cfg)
    before: dict[str, float] = {}
    before_rows: list[dict] = []
    for strategy in ("direct", "few_shot"):
        summary, rows = evaluate(
            model,
            tok,
            task,
            strategy=strategy,
            split="test",
            limit=cfg.eval_limit,
            progress=cfg.run.progress,
            desc=f"baseline {strategy}",
        )
        before.update({f"{strategy}/{k}": v for k, v in summary.items()})
        before_rows += rows[:4]
        print(
            f"      {strategy:<9} accuracy {summary['accuracy']:.3f}, "
            f"answer rate {summary['answer_rate']:.3f}",
            flush=True,
        )
    del model

    # 2. RFT: sample few-shot reasoning paths, keep the correct ones, LoRA SFT on them
    print(
        f"\n[2/4] RFT: {cfg.k} samples for each of {cfg.questions} training questions, then LoRA SFT",
        flush=True,
    )
    rcfg = rft.Config()
    rcfg.model.name = cfg.model
    rcfg.questions = cfg.questions
    rcfg.k = cfg.k
    rcfg.max_per_question = 4
    rcfg.eval_limit = cfg.eval_limit
    rcfg.eval_max_new_tokens = 48
    rcfg.gen = dataclasses.replace(rcfg.gen, max_new_tokens=48, temperature=0.7)
    rcfg.train = dataclasses.replace(rcfg.train, epochs=cfg.epochs, batch_size=8, eval_every=0)
    rcfg.optim = dataclasses.replace(rcfg.optim, warmup_steps=2)
    rcfg.run = dataclasses.replace(cfg.run, name=name, save_every=0)
    rcfg.task = task_cfg
    rft.main(rcfg)
    run_dir = Path(cfg.run.out_dir) / name
    if not run_dir.is_dir():  # Run.start picks a fresh name when one exists
        run_dir = sorted(Path(cfg.run.out_dir).glob(name + "*"), key=lambda p: p.stat().st_mtime)[
            -1
        ]
    results = json.loads((run_dir / "results.json").read_text())
    after = {f"direct/{k}": v for k, v in results["test"].items()}

    # 3. before / after, on the same questions
    print("\n[3/4] before / after on the same test questions", flush=True)
    run = Run(run_dir, cfg.run)
    run.write_json("eval_before.json", {"summary": before, "examples": before_rows})
    run.write_json("eval_after.json", {"summary": after})
    for key in ("direct/accuracy", "direct/answer_rate", "few_shot/accuracy"):
        a = after.get(key)
        print(
            f"      {key:<20} before {before.get(key, float('nan')):.3f}"
            + (f"   after RFT {a:.3f}" if a is not None else ""),
            flush=True,
        )

    print("\n[4/4] report", flush=True)
    report = build_report(run_dir)
    minutes = (time.perf_counter() - t0) / 60
    print(f"\ndone in {minutes:.1f} min. Open the report: {report}", flush=True)
    return 0
