"""A fake task for the online-RL smoke tests (the real tasks have their own tests)."""

from __future__ import annotations

import torch

from posttrain.rollout import GenerationConfig
from posttrain.tasks.base import columns

WORDS = ["hello", "The movie was", "Convert 3 feet", "How many grams", "This film is", "world"]

# reward file: the fraction of the letter 'e' in the completion (any text scores)
REWARD_PY = (
    "def e_rate(prompts, completions, batch):\n"
    "    return [c.count('e') / max(1, len(c)) for c in completions]\n"
)


class FakeTask:
    name = "fake"

    def __init__(self, cfg=None, max_new_tokens: int = 6):
        self.max_new_tokens = max_new_tokens

    def rows(self, split):
        n = {"train": 6, "validation": 3, "test": 3}[split]
        return [{"prompt": WORDS[i % len(WORDS)], "answer": i} for i in range(n)]

    def generation(self):
        return GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=1.0)

    def reward(self, prompts, completions, batch):
        return torch.tensor([float(len(c) % 3) for c in completions])

    def evaluate(self, completions, batch):
        per = [{"len": len(c)} for c in completions]
        return {"mean_len": sum(p["len"] for p in per) / len(per)}, per


def use_fake_task(monkeypatch, **kw):
    import posttrain.tasks

    monkeypatch.setattr(posttrain.tasks, "load_task", lambda cfg: FakeTask(cfg, **kw))


__all__ = ["FakeTask", "use_fake_task", "REWARD_PY", "columns"]
