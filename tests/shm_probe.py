"""Run by tests/test_orphans.py on 2 CPU ranks under `deepspeed`: joins the process group as the project does and
writes to OUT/rank-R.json whether DeepSpeed's shared-memory all-reduce is in use and which of its /dev/shm files
exist right after (`init_distributed` removes their names once every rank has mapped them).

Usage: deepspeed --num_gpus 2 --master_port PORT --no_local_rank tests/shm_probe.py OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed.comm.comm as ds_comm
import torch
import torch.distributed as dist

from launcher.distributed import init_distributed, shutdown_distributed


def main(out: str) -> None:
    init_distributed(False)
    dist.barrier()  # every rank has unlinked its own name by now (each does right after its start)
    mine = f"deepspeed_allreduce_buffer_{os.getuid()}_*_{os.environ['MASTER_PORT']}_*"
    state = {"shm_op": getattr(ds_comm.cdb, "shm_comm_op", None) is not None,
             "files": sorted(p.name for p in Path("/dev/shm").glob(mine))}
    total = torch.ones(4)
    dist.all_reduce(total)  # the shared-memory path still works after the names are gone
    state["all_reduce"] = total.tolist()
    Path(out, f"rank-{dist.get_rank()}.json").write_text(json.dumps(state))
    shutdown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
