"""One reward signature for every online algorithm: (prompts, completions, batch) -> RewardOutput.

A reward is a weighted sum of components named in the `[reward]` config section:

  task                          the task's own reward, `task.reward(prompts, completions, batch)`
  classifier:<hub id or dir>    an AutoModelForSequenceClassification: softmax probability of
                                `reward.label` (name or index), or the raw logit when num_labels == 1
  model:<dir>                   a trained reward model (posttrain reward-model): its raw logit
                                (scored on prompt + completion by default)
  rouge:rouge1|rouge2|rougeL    ROUGE F-score of the completion against batch["reference"]
  python:<module:function>      a Python function f(prompts, completions, batch) -> (B,) floats;
  python:<file.py:function>     also the place for verifiers

    fn = build_reward(cfg.reward, task, device)
    out = fn(roll.prompts, roll.completions, batch)    # out.total (B,), out.components, out.valid
    run.log(step, fn.metrics(out))

A component that raises or returns NaN/inf stops the run with a `RewardError` naming the sample
(its index and the start of its text). With `on_error = "skip"` such samples are marked invalid
(`out.valid` False, total 0), counted in "reward/skipped" and left out of the loss. When a batch
call raises, the component is re-run one sample at a time to find the culprit.

`normalize = true` divides the total by a running standard deviation (and subtracts a running mean)
over every reward seen so far; its state is in `state_dict()` for resume.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from posttrain.config import ConfigError, check

Batch = dict[str, list[Any]]
ScoreFn = Callable[[list[str], list[str], Batch], Any]


@dataclass
class RewardConfig:
    components: list[str] = field(default_factory=lambda: ["task"])
    """reward sources: task, classifier:<hub id or dir>, model:<reward model dir>, rouge:rouge1|rouge2|rougeL, python:<module:function or file.py:function>"""
    weights: list[float] = field(default_factory=list)
    """one weight per component (empty: all 1.0); the total reward is the weighted sum"""
    label: str = "POSITIVE"
    """classifiers with several labels: the label (name, or index as a number) whose probability is the reward"""
    classifier_input: Literal["auto", "completion", "prompt_completion"] = "auto"
    """text a classifier / reward model scores: auto = completion for classifier:, prompt + completion for model:"""
    reference_field: str = "reference"
    """rouge: the batch field holding the reference text"""
    batch_size: int = check(32, ">= 1")
    """classifier / reward-model batch size"""
    max_length: int = check(512, ">= 1")
    """classifier / reward-model inputs are truncated to this many tokens"""
    device: str = "auto"
    """device for classifiers and reward models (auto: the policy's device)"""
    on_error: Literal["raise", "skip"] = "raise"
    """a reward that raises or is NaN/inf: raise (stop the run, naming the sample) or skip (mark the sample invalid, count it, leave it out of the loss)"""
    normalize: bool = False
    """standardise the total reward with a running mean and std over all rewards so far"""
    clip: float = check(0.0, ">= 0")
    """after normalisation, clip the total reward to [-clip, clip] (0: no clipping)"""


@dataclass
class RewardOutput:
    total: Tensor
    """(B,) weighted sum of components (normalised if configured); 0 where not valid"""
    components: dict[str, Tensor]
    """component name -> (B,) raw (unweighted) values; NaN where that component failed"""
    valid: Tensor
    """(B,) bool: every component gave a finite value"""
    raw_total: Tensor | None = None
    """(B,) the weighted sum before normalisation (same as total when normalize is off)"""


class RewardError(RuntimeError):
    """A reward component failed on a sample; the message names the sample and the way out."""


# ---------------------------------------------------------------------------------------------
# Components


def load_function(spec: str, kind: str = "python reward") -> Callable[..., Any]:
    """`package.module:function` or `path/to/file.py:function` -> the function (`kind` names it
    in errors: "python reward", "tool")."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(
            f"{kind} {spec!r}: give it as module:function or path/to/file.py:function"
        )
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise ConfigError(f"{kind} file {target!r} not found")
        mod_name = f"posttrain_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        mod_spec = importlib.util.spec_from_file_location(mod_name, path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_name] = module
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"{kind} {spec!r}: cannot import {target!r}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{kind} {spec!r}: {target!r} has no function {name!r}")
    return fn


class ClassifierScorer:
    """Batched sequence-classifier reward on its own device.

    num_labels == 1 (a Bradley-Terry reward model): the raw logit. Otherwise: softmax probability
    of `label`, given by name (from config.id2label, case-insensitive) or index. A model whose
    config has `posttrain_score_suffix` (a reward model trained with `score_suffix`) scores
    text + suffix.
    """

    def __init__(
        self,
        name: str,
        label: str,
        device: torch.device,
        *,
        batch_size: int = 32,
        max_length: int = 512,
        use_prompt: bool = False,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForSequenceClassification.from_pretrained(name)
        except OSError as e:
            raise ConfigError(
                f"reward classifier {name!r} cannot be loaded: {e}. Give a local directory "
                "holding a saved AutoModelForSequenceClassification, or a hub id in the local cache."
            ) from e
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token or self.tok.unk_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.tok.padding_side = "right"
        self.model.to(device).eval().requires_grad_(False)
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.use_prompt = use_prompt
        # a posttrain reward model trained with a scoring suffix reads its score after it
        self.suffix = str(getattr(self.model.config, "posttrain_score_suffix", "") or "")
        if self.suffix:  # a text over max_length loses its start, never the suffix
            self.tok.truncation_side = "left"
        self.index = None if self.model.config.num_labels == 1 else self._label_index(name, label)

    def _label_index(self, name: str, label: str) -> int:
        n = self.model.config.num_labels
        id2label = {int(k): str(v) for k, v in (self.model.config.id2label or {}).items()}
        labels = ", ".join(f"{i}={id2label.get(i, i)}" for i in range(n))
        if label.strip().lstrip("-").isdigit():
            idx = int(label)
            if not 0 <= idx < n:
                raise ConfigError(
                    f"reward.label={label}: classifier {name!r} has {n} labels ({labels})"
                )
            return idx
        for i, lab in id2label.items():
            if lab == label or lab.lower() == label.lower():
                return i
        raise ConfigError(
            f"reward.label={label!r} is not a label of classifier {name!r}; its labels are "
            f"{labels}. Set --reward.label to one of these names or indices."
        )

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], batch: Batch) -> Tensor:
        texts = [p + c for p, c in zip(prompts, completions)] if self.use_prompt else completions
        if self.suffix:
            texts = [t + self.suffix for t in texts]
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tok(
                texts[s : s + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**enc).logits.float()  # (b, num_labels)
            if self.index is None:
                out.append(logits[:, 0])
            else:
                out.append(torch.softmax(logits, dim=-1)[:, self.index])
        return torch.cat(out).cpu()


class RougeScorer:
    """ROUGE F-score of each completion against `batch[field]`."""

    def __init__(self, kind: str, field_name: str):
        from rouge_score import rouge_scorer

        if kind not in ("rouge1", "rouge2", "rougeL"):
            raise ConfigError(f"reward component rouge:{kind}: use rouge1, rouge2 or rougeL")
        self.kind = kind
        self.field = field_name
        self.scorer = rouge_scorer.RougeScorer([kind], use_stemmer=True)

    def __call__(self, prompts: list[str], completions: list[str], batch: Batch) -> Tensor:
        if self.field not in batch:
            raise ConfigError(
                f"rouge reward needs a reference text in field {self.field!r}; the batch has "
                f"{', '.join(batch)} (set reward.reference_field)"
            )
        refs = batch[self.field]
        return torch.tensor(
            [self.scorer.score(str(r), c)[self.kind].fmeasure for r, c in zip(refs, completions)]
        )


@dataclass
class Component:
    name: str
    """key in RewardOutput.components and in the logged metrics (reward/<name>)"""
    weight: float
    fn: ScoreFn


def _as_tensor(values: Any, n: int, name: str) -> Tensor:
    t = torch.as_tensor(
        values.detach().cpu() if isinstance(values, Tensor) else values, dtype=torch.float32
    ).reshape(-1)
    if t.shape[0] != n:
        raise RewardError(f"reward component {name!r} returned {t.shape[0]} values for {n} samples")
    return t


def _row(batch: Batch, i: int) -> Batch:
    return {k: [v[i]] for k, v in batch.items() if isinstance(v, Sequence) and len(v) > i}


def _describe(i: int, prompts: list[str], completions: list[str]) -> str:
    return f"sample {i} (prompt {prompts[i][-60:]!r}, completion {completions[i][:80]!r})"


class RewardFn:
    """The configured reward: call it on a batch of texts, log its `metrics`."""

    def __init__(self, components: list[Component], cfg: RewardConfig):
        self.components = components
        self.cfg = cfg
        # running moments of the raw total (Welford), for normalize
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def _score(
        self, comp: Component, prompts: list[str], completions: list[str], batch: Batch
    ) -> Tensor:
        """(B,) values of one component; NaN for samples that failed under on_error=skip."""
        n = len(completions)
        try:
            values = _as_tensor(comp.fn(prompts, completions, batch), n, comp.name)
        except (RewardError, ConfigError):
            raise
        except Exception:
            # Find the failing sample(s) by scoring one row at a time.
            values = torch.full((n,), float("nan"))
            for i in range(n):
                try:
                    values[i] = _as_tensor(
                        comp.fn([prompts[i]], [completions[i]], _row(batch, i)), 1, comp.name
                    )[0]
                except Exception as e:
                    if self.cfg.on_error == "raise":
                        raise RewardError(
                            f"reward component {comp.name!r} raised {type(e).__name__}: {e} on "
                            f"{_describe(i, prompts, completions)}. Fix the reward, or set "
                            "--reward.on_error=skip to skip and count such samples."
                        ) from e
        bad = ~torch.isfinite(values)
        if bad.any() and self.cfg.on_error == "raise":
            i = int(bad.nonzero()[0])
            raise RewardError(
                f"reward component {comp.name!r} returned {values[i].item()} for "
                f"{_describe(i, prompts, completions)}. Fix the reward, or set "
                "--reward.on_error=skip to skip and count such samples."
            )
        return values

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        batch: Batch,
        *,
        update_stats: bool = True,
    ) -> RewardOutput:
        """Score a batch. update_stats=False (evaluation) leaves the running normaliser as it is."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        comps = {c.name: self._score(c, prompts, completions, batch) for c in self.components}
        valid = torch.ones(len(completions), dtype=torch.bool)
        raw = torch.zeros(len(completions))
        for c in self.components:
            valid &= torch.isfinite(comps[c.name])
            raw = raw + c.weight * comps[c.name]
        raw = torch.where(valid, raw, torch.zeros_like(raw))
        total = raw
        if self.cfg.normalize:
            if update_stats:
                self._update_moments(raw[valid])
            std = math.sqrt(self.m2 / max(self.count - 1, 1)) if self.count > 1 else 1.0
            total = torch.where(valid, (raw - self.mean) / max(std, 1e-6), torch.zeros_like(raw))
        if self.cfg.clip > 0:
            total = total.clamp(-self.cfg.clip, self.cfg.clip)
        return RewardOutput(total=total, components=comps, valid=valid, raw_total=raw)

    def _update_moments(self, x: Tensor) -> None:
        """Chan et al.'s parallel update of (count, mean, M2) with a batch."""
        n = int(x.numel())
        if n == 0:
            return
        b_mean = float(x.mean())
        b_m2 = float(((x - b_mean) ** 2).sum())
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.m2 += b_m2 + delta**2 * self.count * n / total
        self.count = total

    def metrics(self, out: RewardOutput) -> dict[str, float]:
        """Flat metrics: reward/<component> means over valid samples, reward/skipped count."""
        m: dict[str, float] = {}
        v = out.valid
        for name, values in out.components.items():
            m[f"reward/{name}"] = float(values[v].mean()) if v.any() else float("nan")
        m["reward/skipped"] = float((~v).sum())
        if self.cfg.normalize:
            m["reward/running_mean"] = self.mean
            m["reward/running_std"] = (
                math.sqrt(self.m2 / max(self.count - 1, 1)) if self.count > 1 else 1.0
            )
        return m

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("count", 0))
        self.mean = float(state.get("mean", 0.0))
        self.m2 = float(state.get("m2", 0.0))


def _task_scorer(task: Any) -> ScoreFn:
    def score(prompts: list[str], completions: list[str], batch: Batch) -> Any:
        return task.reward(prompts, completions, batch)

    return score


def build_reward(cfg: RewardConfig, task: Any | None, device: torch.device | str) -> RewardFn:
    """The reward named by `cfg` (task may be None when no component is "task")."""
    if not cfg.components:
        raise ConfigError("reward.components is empty; name at least one, e.g. ['task']")
    weights = list(cfg.weights) or [1.0] * len(cfg.components)
    if len(weights) != len(cfg.components):
        raise ConfigError(
            f"reward.weights has {len(weights)} values for {len(cfg.components)} components "
            f"({', '.join(cfg.components)}); give one weight per component or none"
        )
    dev = torch.device(device) if cfg.device == "auto" else torch.device(cfg.device)
    comps: list[Component] = []
    for spec, w in zip(cfg.components, weights):
        kind, _, arg = spec.partition(":")
        if kind == "task":
            if task is None:
                raise ConfigError("reward component 'task' needs a task ([task] section)")
            name, fn = "task", _task_scorer(task)
        elif kind in ("classifier", "model"):
            if not arg:
                raise ConfigError(f"reward component {spec!r}: give {kind}:<hub id or directory>")
            use_prompt = (
                kind == "model"
                if cfg.classifier_input == "auto"
                else cfg.classifier_input == "prompt_completion"
            )
            name = kind
            fn = ClassifierScorer(
                arg,
                cfg.label,
                dev,
                batch_size=cfg.batch_size,
                max_length=cfg.max_length,
                use_prompt=use_prompt,
            )
        elif kind == "rouge":
            name, fn = arg or "rouge1", RougeScorer(arg or "rouge1", cfg.reference_field)
        elif kind == "python":
            name, fn = arg.rpartition(":")[2] or "python", load_function(arg)
        else:
            raise ConfigError(
                f"unknown reward component {spec!r}; use task, classifier:<id or dir>, "
                "model:<dir>, rouge:rouge1|rouge2|rougeL or python:<module:function>"
            )
        base, k = name, 2
        while any(c.name == name for c in comps):
            name, k = f"{base}_{k}", k + 1
        comps.append(Component(name=name, weight=float(w), fn=fn))
    return RewardFn(comps, cfg)
