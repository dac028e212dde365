"""The GPU tier: every test here is marked `gpu` and skipped, with one clear reason, without CUDA.

`make gpu-check` runs this folder and then bench/gpu_bench.py; it fits in 5 minutes on one GPU.
POSTTRAIN_GPU_TIER_ON_CPU=1 runs the tests that do not need CUDA itself (the commands for 2 steps,
accelerate's bf16 config) on the CPU, to check the tier's own arguments on a machine without one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "smoke"))  # rl_fakes

ON_CPU = os.environ.get("POSTTRAIN_GPU_TIER_ON_CPU") == "1"


def pytest_collection_modifyitems(config, items):
    import torch

    here = Path(__file__).resolve().parent
    for item in items:
        if here not in Path(str(item.fspath)).resolve().parents:
            continue
        item.add_marker(pytest.mark.gpu)
        if torch.cuda.is_available():
            continue
        if ON_CPU and "cuda_only" not in item.keywords:
            continue
        item.add_marker(
            pytest.mark.skip(
                reason="gpu tier: no CUDA device here (torch.cuda.is_available() is False)"
            )
        )
