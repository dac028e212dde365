"""RFT: filtering and deduplication with a fake generator; the command on the tiny model."""

from __future__ import annotations

import json

import torch

from posttrain.algos.rft import Config, normalise, reasoning_of, sample_records, select
from posttrain.cli import main
from posttrain.runs import read_jsonl

ROWS = [
    {"prompt": "q1", "question": "How many cm in 2 m?", "answer": 200.0},
    {"prompt": "q2", "question": "How many g in 3 kg?", "answer": 3000.0},
    {"prompt": "q3", "question": "How many mm in 1 m?", "answer": 1000.0},
]


class FakeTask:
    """Reward 1 when the <answer> tag holds the row's answer."""

    name = "fake"

    def rows(self, split):
        return {"train": ROWS, "validation": ROWS[:1], "test": ROWS}[split]

    def reward(self, prompts, completions, batch):
        return torch.tensor(
            [float(f"<answer>{int(a)}</answer>" in c) for c, a in zip(completions, batch["answer"])]
        )

    def evaluate(self, completions, batch):
        r = self.reward([], completions, batch)
        return {"accuracy": float(r.mean())}, [{"correct": bool(x)} for x in r]


SAMPLES = {
    # two correct paths that differ only in case and spacing, one other correct path, one wrong
    "q1": [
        "1 m = 100 cm. 2 * 100 = <answer>200</answer> trailing",
        "1 M = 100 cm.  2 * 100 = <answer>200</answer>",
        "2 m is 200 cm: <answer>200</answer>",
        "<answer>20</answer>",
    ],
    # no correct sample: the question is dropped
    "q2": ["<answer>30</answer>", "<answer>300</answer>", "no tag", "<answer>3</answer>"],
    # one correct sample repeated four times
    "q3": ["1 m = 1000 mm <answer>1000</answer>"] * 4,
}


def fake_gen(calls):
    def gen(prompts, cfg):
        calls.append((list(prompts), cfg))
        assert cfg.n == 4 and cfg.temperature > 0
        return [s for p in prompts for s in SAMPLES[p]]

    return gen


def test_normalise_and_reasoning_cut():
    assert normalise("  1 M =\n100 cm. ") == "1 m = 100 cm"
    assert reasoning_of("x <answer>2</answer> more <answer>3</answer>") == "x <answer>2</answer>"
    assert reasoning_of(" no tag ") == "no tag"


def test_verifier_keeps_distinct_correct_paths_and_drops_unsolved_questions():
    cfg = Config(k=4)
    calls = []
    records, stats = sample_records(
        fake_gen(calls), FakeTask(), ROWS, [r["prompt"] for r in ROWS], cfg.gen, cfg
    )
    assert len(calls) == 1  # one batched call for all questions
    got = [(r["question"], r["reasoning"]) for r in records]
    assert got == [
        ("How many cm in 2 m?", "1 m = 100 cm. 2 * 100 = <answer>200</answer>"),
        ("How many cm in 2 m?", "2 m is 200 cm: <answer>200</answer>"),
        ("How many mm in 1 m?", "1 m = 1000 mm <answer>1000</answer>"),
    ]
    assert records[0]["answer"] == 200.0
    assert stats["questions"] == 3 and stats["questions_kept"] == 2
    assert stats["share_questions_kept"] == 2 / 3
    assert stats["share_samples_correct"] == 7 / 12
    assert stats["records"] == 3


def test_max_per_question_and_best_of_n():
    completions = [s for r in ROWS for s in SAMPLES[r["prompt"]]]
    rewards = FakeTask().reward(
        [], completions, {"answer": [r["answer"] for r in ROWS for _ in range(4)]}
    )
    records, _ = select(ROWS, completions, rewards, k=4, max_per_question=1)
    assert [r["question"] for r in records] == ["How many cm in 2 m?", "How many mm in 1 m?"]

    # best-of-n keeps the top-reward distinct sample of every question, correct or not
    graded = torch.tensor(
        [0.1, 0.9, 0.5, 0.0, 0.2, 0.7, 0.7, 0.1, 0.3, 0.3, 0.3, 0.3], dtype=torch.float64
    )
    records, stats = select(ROWS, completions, graded, k=4, mode="best_of_n", best_of=2)
    assert [(r["reasoning"], r["reward"]) for r in records] == [
        ("1 M = 100 cm.  2 * 100 = <answer>200</answer>", 0.9),
        ("2 m is 200 cm: <answer>200</answer>", 0.5),
        ("<answer>300</answer>", 0.7),
        ("no tag", 0.7),
        ("1 m = 1000 mm <answer>1000</answer>", 0.3),
    ]
    assert stats["share_questions_kept"] == 1.0


def test_rft_command_samples_filters_and_trains(tiny_dir, tmp_path, monkeypatch):
    """The tiny random model cannot solve anything, so the fake task rewards any completion: the
    run must sample k per question, dedupe, write the dataset, train, and iterate twice."""
    import posttrain.tasks

    class AnyTask(FakeTask):
        def reward(self, prompts, completions, batch):
            return torch.ones(len(completions))

    monkeypatch.setattr(posttrain.tasks, "load_task", lambda cfg: AnyTask())
    out = tmp_path / "runs"
    argv = [
        "rft", "--model.name", str(tiny_dir), "--k=3", "--iterations=2",
        "--gen.max_new_tokens=6", "--train.max_steps=2", "--train.batch_size=2",
        "--eval_limit=2", "--eval_max_new_tokens=4", "--lora.r=4",
        "--run.out_dir", str(out), "--run.progress=false", "--run.threads=1",
    ]  # fmt: skip
    assert main(argv) == 0
    (run,) = list(out.iterdir())
    data = json.loads((run / "rft_data_0.json").read_text())
    assert data["stats"]["questions"] == 3 and data["stats"]["share_questions_kept"] == 1.0
    assert 3 <= len(data["records"]) <= 9
    assert {"question", "answer", "reasoning"} <= set(data["records"][0])
    assert (run / "rft_data_1.json").is_file()
    samples = read_jsonl(run / "samples.jsonl")
    assert len(samples) == 2 * 3 * 3  # two rounds x 3 questions x k = 3
    assert {"question", "completion", "reward"} <= set(samples[0])
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]  # two iterations of two steps, numbered on
    assert (run / "final" / "adapter_config.json").is_file()
    results = json.loads((run / "results.json").read_text())
    assert "accuracy" in results["test"] and results["adapter_size_mb"] > 0


def test_best_of_n_on_a_task_without_questions(tiny_dir, tmp_path):
    """docs/algorithms/rft.md's `--task.name=sentiment --mode=best_of_n`: sentiment rows have a
    text prompt and no `question`; the prompt stands in for it in the records and the test eval."""
    out = tmp_path / "runs"
    argv = [
        "rft", "--task.name=sentiment", "--mode=best_of_n", "--best_of=1", "--k=2",
        "--model.name", str(tiny_dir), "--questions=2", "--gen.max_new_tokens=4",
        "--train.max_steps=1", "--eval_limit=2", "--eval_max_new_tokens=4", "--lora.r=4",
        "--run.out_dir", str(out), "--run.progress=false", "--run.threads=1",
    ]  # fmt: skip
    assert main(argv) == 0
    (run,) = list(out.iterdir())
    records = json.loads((run / "rft_data_0.json").read_text())["records"]
    assert len(records) == 2 and all(r["question"] for r in records)
    assert "reward_mean" in json.loads((run / "results.json").read_text())["test"]
