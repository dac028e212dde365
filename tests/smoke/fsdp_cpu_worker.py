"""Worker of test_fsdp_cpu.py: 3 AdamW steps of the tiny Llama, run as one process (the whole
batch of 4) or under torchrun as 2 processes with torch's FSDP2 `fully_shard` on gloo (each layer
and the whole model sharded, each process 2 rows). Writes the per-step losses (averaged over
processes) and the full parameters to OUT.

    python tests/smoke/fsdp_cpu_worker.py OUT
    torchrun --nproc_per_node=2 tests/smoke/fsdp_cpu_worker.py OUT
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import build_model, build_tokenizer  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    tok = build_tokenizer()
    ids = torch.randint(3, len(tok), (4, 16), generator=torch.Generator().manual_seed(0))  # (B, T)
    model = build_model(tok).train()
    world, rank = 1, 0
    if "RANK" in os.environ:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    rows = ids.shape[0] // world
    batch = ids[rank * rows : (rank + 1) * rows]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=batch, labels=batch).loss  # token mean: equal rows, equal tokens
        loss.backward()  # FSDP reduce-scatters the gradients: the mean over processes
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    state = {k: getattr(v, "full_tensor", lambda v=v: v)() for k, v in model.state_dict().items()}
    if world > 1:
        import torch.distributed as dist

        for t in losses:
            dist.all_reduce(t)
        losses = [t / world for t in losses]
        # Free the sharded model (it holds the group) before the group goes: left to the
        # interpreter's teardown, gloo's threads aborted 4 of 36 runs; 0 of 60 with this.
        del model, opt, batch
        gc.collect()
        dist.barrier()  # both ranks done with gloo before either tears it down
        dist.destroy_process_group()
    if rank == 0:
        torch.save({"losses": [float(t) for t in losses], "state": state}, out)


if __name__ == "__main__":
    main(sys.argv[1])
