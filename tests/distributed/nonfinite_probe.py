"""Launched by tests/test_faults.py under torchrun (2 ranks, gloo): a non-finite loss on one rank
only. Both the gate pass and the delta pass must raise TrainingError on *every* rank, promptly; a
rank raising alone would leave its peer blocked in the next collective until the timeout.

Each rank writes ``argv[1]``.rank<N>.json: per phase, the error type and message and the seconds
it took. The process group's timeout is 60 s, so a hang shows as a backend error after ~60 s.
"""

import json
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])

import torch  # noqa: E402

from s3delta_ds.engine import zero  # noqa: E402
from s3delta_ds.engine.bilevel import BiLevel, delta_update  # noqa: E402
from s3delta_ds.engine.gatelogits import GateLogits  # noqa: E402
from tests.test_second_order import t5_batches, tiny_t5_supernet  # noqa: E402


class Engine:
    """The part of a DeepSpeed engine the two phases use, on a plain module (fp32, no ZeRO)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, batch):
        return self.module(batch)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass

    def gradient_accumulation_steps(self):
        return 1


def main() -> None:
    rank, _ = zero.init_distributed(timeout_s=60)
    module, n = tiny_t5_supernet()
    if rank == 1:  # this rank's loss alone is non-finite
        with torch.no_grad():
            next(p for p in module.parameters() if p.requires_grad).fill_(float("nan"))
    engine = Engine(module)
    gates = GateLogits([1000] * n, 100.0 * n, lr=0.1, clip=0.0, total_steps=10, beta=1.0, temperature=1.0,
                       seed=0, device=torch.device("cpu"))  # fmt: skip
    bilevel = BiLevel(engine, gates, mode="first-order", device=torch.device("cpu"))
    batches = t5_batches(module, 1)
    report = {}
    for phase, call in (
        ("gate", lambda: bilevel.gate_step(batches, step=0)),
        ("delta", lambda: delta_update(engine, module, batches, torch.device("cpu"))),
    ):
        t0 = time.perf_counter()
        try:
            call()
            report[phase] = {"error": None}
        except Exception as e:  # noqa: BLE001 - the type is what the test checks
            report[phase] = {"error": type(e).__name__, "message": str(e)}
        report[phase]["seconds"] = time.perf_counter() - t0
        if report[phase]["error"] not in (None, "TrainingError"):
            break  # the group is broken: later phases would only time out again
    Path(f"{sys.argv[1]}.rank{rank}.json").write_text(json.dumps(report))
    zero.destroy()


if __name__ == "__main__":
    main()
