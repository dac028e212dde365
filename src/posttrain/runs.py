"""Run directories: resolved config, metrics, samples, checkpoints, exact resume.

    runs/<name>/
      config.toml      the resolved config
      metrics.jsonl    one flat JSON object per logged step (flushed as written)
      samples.jsonl    prompts, completions and rewards at chosen steps
      checkpoints/step_000010/   model.safetensors (or adapter), optim.pt, rng.pt, state.json
      tb/              TensorBoard events (optional)

A checkpoint is written into a temporary directory and renamed into place, so a kill at any moment
leaves the previous checkpoint whole. On resume, metrics and samples logged after the checkpoint
are dropped, so the files hold every step exactly once.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain import cpu
from posttrain.config import RunConfig
from posttrain.config_text import save_config, to_dict

CKPT_RE = re.compile(r"^step_(\d+)$")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().item() if v.numel() == 1 else v.detach().cpu().tolist()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class Run:
    """One run directory. Create with `Run.start(cfg.run, command, cfg)`."""

    def __init__(self, path: Path, rcfg: RunConfig, is_main: bool = True):
        self.path = path
        self.rcfg = rcfg
        self.is_main = is_main
        self._tb: Any = None
        self._last_log = time.perf_counter()

    # ---- creation -----------------------------------------------------------------------
    @classmethod
    def start(cls, rcfg: RunConfig, command: str, cfg: Any = None, is_main: bool = True) -> Run:
        """A new run directory (never overwriting one), or the one given in rcfg.resume."""
        if rcfg.resume:
            path = Path(rcfg.resume)
            if not (path / "config.toml").is_file():
                raise FileNotFoundError(f"--run.resume: {str(path)!r} is not a run directory")
            run = cls(path, rcfg, is_main)
            return run
        name = rcfg.name or f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
        root = Path(rcfg.out_dir)
        path = root / name
        if is_main:
            root.mkdir(parents=True, exist_ok=True)
            k = 1
            while True:
                try:
                    path.mkdir()
                    break
                except FileExistsError:
                    if _never_ran(path):  # an earlier start that failed before its first step
                        break
                    k += 1
                    path = root / f"{name}-{k}"
            if cfg is not None:
                save_config(cfg, path / "config.toml")
            (path / "run.json").write_text(
                json.dumps(
                    {"command": command, "started": time.time(), "pid": os.getpid()}, indent=1
                )
            )
        return cls(path, rcfg, is_main)

    # ---- records ------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, Any], echo: bool = True) -> dict[str, Any]:
        """Append one flat record {"step": step, ...} to metrics.jsonl (and TensorBoard)."""
        rec = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        if not self.is_main:
            return rec
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
        if self.rcfg.tensorboard:
            self._tensorboard(step, rec)
        if echo:
            keys = [k for k in rec if k != "step" and isinstance(rec[k], int | float)][:8]
            line = " ".join(f"{k}={rec[k]:.4g}" for k in keys)
            print(f"[step {step}] {line}", flush=True)
        return rec

    def _tensorboard(self, step: int, rec: dict[str, Any]) -> None:
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path / "tb"))
        for k, v in rec.items():
            if k != "step" and isinstance(v, int | float):
                self._tb.add_scalar(k.replace(".", "/"), v, step)
        self._tb.flush()

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Append sample generations (one JSON line each, tagged with the step)."""
        if not self.is_main or not rows:
            return
        with open(self.path / "samples.jsonl", "a") as f:
            for r in rows:
                f.write(
                    json.dumps({"step": step, **{k: _jsonable(v) for k, v in r.items()}}) + "\n"
                )

    def eval_record(
        self, step: int, summary: dict[str, Any], examples: list[dict[str, Any]] | None = None
    ) -> None:
        """The before/after evaluation the report's "Evaluation" table shows: eval_before.json at
        step 0, eval_after.json at any later step (the last evaluation wins: the end of training
        for a run that finished). Every command that evaluates at step 0 and at the end calls it.
        `summary` may be a logged record: its `step` is dropped and an `eval/` prefix stripped."""
        summary = {
            k.removeprefix("eval/"): v
            for k, v in summary.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
        }
        name = "eval_before.json" if step == 0 else "eval_after.json"
        self.write_json(name, {"step": step, "summary": summary, "examples": (examples or [])[:8]})

    def write_json(self, name: str, obj: Any) -> Path:
        p = self.path / name
        if self.is_main:
            p.write_text(json.dumps(obj, indent=1, default=_jsonable))
        return p

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    # ---- checkpoints --------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        return self.path / "checkpoints"

    def checkpoints(self) -> list[Path]:
        if not self.ckpt_root.is_dir():
            return []
        found = [p for p in self.ckpt_root.iterdir() if CKPT_RE.match(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))  # type: ignore[union-attr]

    def latest_checkpoint(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def save_checkpoint(
        self,
        step: int,
        modules: dict[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        state: dict[str, Any] | None = None,
    ) -> Path | None:
        """Atomically write step_<step>/ and keep the last rcfg.keep_checkpoints of them."""
        if not self.is_main:
            return None
        self.ckpt_root.mkdir(parents=True, exist_ok=True)
        final = self.ckpt_root / f"step_{step:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.ckpt_root))
        # Ignore Ctrl-C while the directory is written and renamed.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            for name, module in modules.items():
                save_module(module, tmp / name)
            extra: dict[str, Any] = {"rng": rng_state()}
            if optimizer is not None:
                extra["optimizer"] = optimizer.state_dict()
            if scheduler is not None:
                extra["scheduler"] = scheduler.state_dict()
            torch.save(extra, tmp / "trainer_state.pt")
            record = {"step": step, **(state or {})}
            kernels = cpu.choices()  # run.onednn=auto's kernels: the resumed run takes the same
            if kernels:
                record["kernels"] = kernels
            (tmp / "state.json").write_text(json.dumps(record, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                signal.signal(signal.SIGINT, old)
        for stale in self.checkpoints()[: -max(1, self.rcfg.keep_checkpoints)]:
            shutil.rmtree(stale, ignore_errors=True)
        return final

    def load_checkpoint(
        self,
        modules: dict[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        path: Path | None = None,
    ) -> dict[str, Any]:
        """Restore the latest checkpoint (weights, optimizer, scheduler, RNG) and return its state.

        Also truncates metrics.jsonl and samples.jsonl to the checkpoint's step.
        """
        ckpt = path or self.latest_checkpoint()
        if ckpt is None:
            raise FileNotFoundError(f"no checkpoint in {str(self.ckpt_root)!r} to resume from")
        for name, module in modules.items():
            load_module(module, ckpt / name)
        extra = torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu")
        if optimizer is not None and "optimizer" in extra:
            optimizer.load_state_dict(extra["optimizer"])
        if scheduler is not None and "scheduler" in extra:
            scheduler.load_state_dict(extra["scheduler"])
        set_rng_state(extra["rng"])
        state = json.loads((ckpt / "state.json").read_text())
        if self.is_main:
            for fname in ("metrics.jsonl", "samples.jsonl"):
                _truncate_jsonl(self.path / fname, state["step"])
        return state


def _never_ran(path: Path) -> bool:
    """A run directory that a failed start left behind (a config error, a missing model): only
    config.toml, run.json and empty files, written by this process or by one that has ended.
    The next run with the same name reuses it instead of becoming NAME-2."""
    entries = list(path.iterdir())
    if not (path / "run.json").is_file() or any(
        not p.is_file() or (p.name not in ("config.toml", "run.json") and p.stat().st_size)
        for p in entries
    ):
        return False
    try:
        pid = json.loads((path / "run.json").read_text()).get("pid")
    except json.JSONDecodeError:
        return False
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _truncate_jsonl(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def save_module(module: torch.nn.Module, folder: Path) -> None:
    """Save trainable state as safetensors: a LoRA adapter (peft) or the full module's weights."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    from posttrain.models import is_peft

    if is_peft(module):
        module.save_pretrained(str(folder))  # type: ignore[operator]
    else:
        save_model(module, str(folder / "model.safetensors"))


def load_module(module: torch.nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file, load_model

    from posttrain.models import is_peft

    if is_peft(module):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(module, load_file(str(folder / "adapter_model.safetensors")))
    else:
        load_model(module, str(folder / "model.safetensors"))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def config_dict(run_dir: str | Path) -> dict[str, Any]:
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    p = Path(run_dir) / "config.toml"
    return tomllib.loads(p.read_text()) if p.is_file() else {}


__all__ = ["Run", "seed_everything", "read_jsonl", "config_dict", "to_dict"]


# ---------------------------------------------------------------------------------------------
# What a trained folder remembers: how its prompts looked and which tools it called

TRAINED_FORMAT = "posttrain.json"


def write_trained_format(
    folder: str | Path,
    command: str,
    *,
    task: Any = None,
    strategy: str | None = None,
    prompt_template: str | None = None,
    chat: bool = False,
    system_prompt: str | None = None,
    tools: Any = None,
) -> Path:
    """FOLDER/posttrain.json: the training task (a TaskConfig; None when trained on a data file),
    the prompting strategy its prompts followed (direct, cot, ...; None: none of them), the
    prompt template, chat, system prompt and tools (a ToolConfig; None or no names: none).
    `posttrain eval --model/--adapter FOLDER` fills what its command line leaves unset from it."""
    import dataclasses

    info = {
        "command": command,
        "task": dataclasses.asdict(task) if task is not None else None,
        "strategy": strategy,
        "prompt_template": prompt_template,
        "chat": bool(chat),
        "system_prompt": system_prompt,
        "tools": dataclasses.asdict(tools) if tools is not None and tools.names else None,
    }
    path = Path(folder) / TRAINED_FORMAT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1) + "\n")
    return path


def read_trained_format(folder: str | Path | None) -> dict[str, Any] | None:
    """The posttrain.json of a trained folder, or None (hub ids, folders trained elsewhere)."""
    if not folder:
        return None
    path = Path(folder) / TRAINED_FORMAT
    return json.loads(path.read_text()) if path.is_file() else None


def write_online_format(run: Run, cfg: Any, gen: Any) -> Path:
    """run/final/posttrain.json for an online command (reinforce, rloo, grpo, ppo): its prompts
    are the task's rows (cfg.task.strategy), sampled with the resolved GenerationConfig `gen`."""
    command = json.loads((run.path / "run.json").read_text())["command"]
    return write_trained_format(
        run.path / "final",
        command,
        task=cfg.task,
        strategy=cfg.task.strategy,
        chat=gen.chat,
        system_prompt=gen.system_prompt,
        tools=cfg.tools,
    )
