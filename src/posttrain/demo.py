"""`posttrain demo` (`make demo`): the whole story on the embedded default, on a CPU in minutes.

1. baseline: chain-of-thought accuracy of SmolLM2-135M-Instruct on unit-conversion test questions;
2. RFT (Yuan et al. 2023): sample k reasoning paths per training question, keep the correct ones,
   LoRA fine-tune on them;
3. the fine-tuned adapter answers the same test questions;
4. an HTML report with the curves, the before/after table and sample generations.

    posttrain demo                                  # defaults sized for ~10 minutes on 2 CPU cores
    posttrain demo --questions=200 --k=10 --eval_limit=200
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.config import RunConfig


@dataclass
class Config:
    questions: int = 96
    """training questions RFT samples reasoning paths for"""
    k: int = 8
    """samples per training question"""
    eval_limit: int = 100
    """test questions evaluated before and after"""
    epochs: int = 2
    """RFT training epochs over the kept reasoning paths"""
    model: str = "default"
    """the model to post-train"""
    run: RunConfig = field(default_factory=lambda: RunConfig(name=None, threads=0))


def main(cfg: Config) -> int:
    from posttrain.algos import rft
    from posttrain.evaluate import evaluate
    from posttrain.models import load_model
    from posttrain.report import build_report
    from posttrain.runs import Run, read_jsonl
    from posttrain.tasks import TaskConfig, load_task

    t0 = time.perf_counter()
    name = cfg.run.name or f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    print(
        "posttrain demo: RFT on unit conversion with the embedded SmolLM2-135M-Instruct\n",
        flush=True,
    )

    # 1. baseline: the base model, zero-shot chain of thought, greedy
    print(
        f"[1/4] baseline: chain-of-thought accuracy on {cfg.eval_limit} test questions", flush=True
    )
    model, tok = load_model(cfg.model)
    task = load_task(TaskConfig(name="unit_conversion"))
    before, before_rows = evaluate(
        model,
        tok,
        task,
        strategy="cot",
        split="test",
        limit=cfg.eval_limit,
        progress=True,
        desc="baseline",
    )
    del model
    print(
        f"      accuracy {before['accuracy']:.3f}, answer rate {before['answer_rate']:.3f}\n",
        flush=True,
    )

    # 2 + 3. RFT: sample, filter, fine-tune, then evaluate on the same test questions
    print(
        f"[2/4] RFT: {cfg.k} samples for each of {cfg.questions} training questions, then LoRA SFT",
        flush=True,
    )
    rcfg = rft.Config()
    rcfg.model.name = cfg.model
    rcfg.questions = cfg.questions
    rcfg.k = cfg.k
    rcfg.max_per_question = 4
    rcfg.eval_limit = cfg.eval_limit
    rcfg.train = dataclasses.replace(rcfg.train, epochs=cfg.epochs, eval_every=0)
    rcfg.run = dataclasses.replace(cfg.run, name=name, save_every=0)
    rcfg.task = TaskConfig(name="unit_conversion", strategy="cot")
    rft.main(rcfg)
    run_dir = Path(cfg.run.out_dir) / name
    if not run_dir.is_dir():  # Run.start picks a fresh name when one exists
        run_dir = sorted(Path(cfg.run.out_dir).glob(name + "*"), key=lambda p: p.stat().st_mtime)[
            -1
        ]
    results = (read_jsonl(run_dir / "metrics.jsonl") or [{}])[-1]
    after = {k.removeprefix("test_"): v for k, v in results.items() if k.startswith("test_")}

    print("\n[3/4] before / after on the same test questions", flush=True)
    run = Run(run_dir, cfg.run)
    run.write_json("eval_before.json", {"summary": before, "examples": before_rows[:8]})
    run.write_json("eval_after.json", {"summary": after})
    for key in ("accuracy", "answer_rate"):
        b, a = before.get(key, float("nan")), after.get(key, float("nan"))
        print(f"      {key:<12} before {b:.3f}   after {a:.3f}", flush=True)

    print("\n[4/4] report", flush=True)
    report = build_report(run_dir)
    minutes = (time.perf_counter() - t0) / 60
    print(f"\ndone in {minutes:.1f} min. Open the report: {report}", flush=True)
    return 0
