"""Launched by tests/test_multinode.py with torchrun (2 ranks): ranks that see different device
memory (a partition mixing 40 and 80 GB GPUs) must still choose one ``deepspeed=auto`` strategy.
Each rank writes what it chose to OUT/rank{N}.json."""

import json
import os
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])

from s3delta_ds.config import ModelConfig  # noqa: E402
from s3delta_ds.engine import zero  # noqa: E402
from s3delta_ds.run.plan import auto_strategy  # noqa: E402


def main():
    out = Path(sys.argv[1])
    zero.init_distributed()
    rank = zero.rank()
    # rank 0's backbone (4 MB in fp32) fits half its memory; rank 1's does not
    os.environ["S3DELTA_DEVICE_MEMORY"] = str(10**9 if rank == 0 else 10**6)
    name, why = auto_strategy(ModelConfig(name_or_path="tiny-t5", dtype="fp32"), 10**6, 1000)
    (out / f"rank{rank}.json").write_text(json.dumps({"memory": zero.device_memory_bytes(), "strategy": name}))
    zero.destroy()


if __name__ == "__main__":
    main()
