"""Launched by tests/test_distributed.py under the deepspeed launcher (2 ranks, ZeRO-3): checks,
inside the ranks, that the frozen backbone is really partitioned and stays bit-identical while the
search trains, and that gate logits stay bit-identical across ranks. Rank 0 writes a JSON report."""

import json
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])

import torch  # noqa: E402

from s3delta_ds.config import load_run_config  # noqa: E402
from s3delta_ds.data import BatchStream, split_halves  # noqa: E402
from s3delta_ds.engine import zero  # noqa: E402
from s3delta_ds.engine.bilevel import BiLevel  # noqa: E402
from s3delta_ds.engine.gatelogits import GateLogits  # noqa: E402
from s3delta_ds.method.objective import DeltaModel  # noqa: E402
from s3delta_ds.method.supernet import DeltaSpec, GateContext, attach, freeze_backbone  # noqa: E402
from s3delta_ds.run.runtime import prepare  # noqa: E402


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, model_name, random_init = args[0], args[1], "random_init" in args[2:]
    overrides = [
        f"output_dir={out}/run",
        f"model.name_or_path={model_name}",
        f"model.random_init={random_init}",
        "search.micro_batch_size=2",
        "search.grad_accum=2",
        "data.max_train_examples=64",
        "data.max_eval_examples=8",
        "deepspeed=zero3_cpu",
        "data.task=tiny-sentiment",
    ]
    cfg = load_run_config(None, [o.replace("=True", "=true").replace("=False", "=false") for o in overrides])
    rt = prepare(cfg, cfg.search, resume=False, kind="probe")
    space = rt.backbone.space("mixed")
    ctx = GateContext()
    torch.manual_seed(0)
    attach(rt.model, rt.site_map, [DeltaSpec(c.site, c.type, c.kwargs, c.index) for c in space.candidates], ctx)
    freeze_backbone(rt.model)
    module = DeltaModel(rt.model, rt.objective, ctx)
    params = [p for p in module.parameters() if p.requires_grad]
    engine = zero.build_engine(module, params, lr=1e-2, weight_decay=0.0, total_steps=4, ds_config=rt.ds_config)
    budget = 0.02 * rt.backbone.info.num_params
    gates = GateLogits(
        space.params, budget, lr=0.1, clip=2.0, total_steps=4, beta=1.0, temperature=1.0, seed=0, device=rt.device
    )
    bilevel = BiLevel(engine, gates, mode="first-order", device=rt.device)

    frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    report = {
        "frozen_tensors": len(frozen),
        "frozen_full": sum(zero.full_numel(p) for _, p in frozen),
        "frozen_local": sum(zero.local_numel(p) for _, p in frozen),
        "frozen_numel_now": sum(p.numel() for _, p in frozen),
        "all_partitioned": all(zero.is_partitioned(p) for _, p in frozen),
        "trainable_partitioned": all(zero.is_partitioned(p) for _, p in trainable),
        "trainable_full": sum(zero.full_numel(p) for _, p in trainable),
        "space_params": space.total_params,
    }
    with zero.gathered([p for _, p in frozen]):
        before = [p.detach().clone() for _, p in frozen]
    with zero.gathered([p for _, p in trainable]):
        t_before = [p.detach().clone() for _, p in trainable]
    w, g = split_halves(rt.data["train"], 0)
    ws = BatchStream(w, micro_batch=2, grad_accum=2, rank=rt.rank, world=rt.world, seed=0, collate=rt.collate)
    gs = BatchStream(g, micro_batch=2, grad_accum=2, rank=rt.rank, world=rt.world, seed=1, collate=rt.collate)
    counters = []
    for step in range(4):
        bilevel.step(ws.next(), gs.next(), step)
        counters.append([engine.global_steps, engine.micro_steps])
    with zero.gathered([p for _, p in frozen]):
        report["frozen_unchanged"] = all(torch.equal(a, p) for a, (_, p) in zip(before, frozen, strict=True))
    with zero.gathered([p for _, p in trainable]):
        report["trainable_changed"] = sum(not torch.equal(a, p) for a, (_, p) in zip(t_before, trainable, strict=True))
    report["trainable_tensors"] = len(trainable)
    report["counters"] = counters
    logits = gates.logits.detach().cpu()
    every = zero.all_gather_object(logits)
    report["gates_identical"] = all(torch.equal(every[0], x) for x in every)
    report["gates_moved"] = float(logits.abs().max())
    report["world"] = rt.world
    if rt.rank == 0:
        Path(out, "probe.json").write_text(json.dumps(report))
    zero.barrier()


if __name__ == "__main__":
    main()
    zero.destroy()
