"""Launched by tests/test_second_order.py (plain python: one process; deepspeed launcher: 2 ranks).
Builds the tiny-T5 search engine, takes two real delta steps, then measures the second-order gate
step. Rank 0 writes a JSON report to ``argv[1]``.

Cases (``argv[2]``):

* ``bf16`` — a bf16 engine against an fp32 copy of the same model (the bf16 backbone and the
  engine's delta values upcast, the engine's AdamW moments): the relative error of the logit
  gradient of the second-order step for each virtual step, and of the first-order step (the
  bf16 floor, for scale); whether the engine's bf16 delta weights came back bit-identical.
* ``moments`` — fp32: the AdamW moments read through ``zero.adamw_state`` and the virtual weights;
  with one process, also what a torch AdamW loaded with the engine's state makes of the same step.

Further arguments are config overrides (``zero_stage=2``, ``search.micro_batch_size=2``, ...).
"""

import copy
import inspect
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path[0] = str(Path(__file__).resolve().parents[2])

import torch  # noqa: E402

from s3delta_ds.config import load_run_config  # noqa: E402
from s3delta_ds.data import BatchStream, split_halves  # noqa: E402
from s3delta_ds.engine import zero  # noqa: E402
from s3delta_ds.engine.bilevel import GATE_PHASE, BiLevel  # noqa: E402
from s3delta_ds.engine.gatelogits import GateLogits  # noqa: E402
from s3delta_ds.method.objective import DeltaModel  # noqa: E402
from s3delta_ds.method.supernet import DeltaSpec, GateContext, attach, cast_deltas, freeze_backbone  # noqa: E402
from s3delta_ds.run.runtime import prepare  # noqa: E402

LR, WEIGHT_DECAY, STEPS = 0.02, 0.01, 2


def supernet(model, rt, space) -> GateContext:
    ctx = GateContext()
    torch.manual_seed(0)
    attach(model, rt.site_map, [DeltaSpec(c.site, c.type, c.kwargs, c.index) for c in space.candidates], ctx)
    return ctx


def gates_for(rt, space) -> GateLogits:
    budget = 0.02 * rt.backbone.info.num_params
    return GateLogits(
        space.params, budget, lr=0.1, clip=0.0, total_steps=100, beta=1.0, temperature=1.0, seed=0, device=rt.device
    )


def make_bilevel(engine, gates, virtual_step, device) -> BiLevel:
    """``virtual_step`` where BiLevel takes it (the code before it always did the SGD step)."""
    if "virtual_step" in inspect.signature(BiLevel).parameters:
        return BiLevel(engine, gates, mode="second-order", device=device, virtual_step=virtual_step)
    return BiLevel(engine, gates, mode="second-order", device=device)


def logit_grad(bilevel, gates, weight_batches, gate_batches, second_order=True) -> torch.Tensor:
    """The gradient the gate optimizer would get (captured: the gates do not move)."""
    seen = []
    gates.apply = lambda g: seen.append(g.detach().double().clone())
    if second_order:
        bilevel.second_order_gate_step(weight_batches, gate_batches, 0)
    else:
        bilevel.gate_step(gate_batches, 0)
    return seen[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def bf16_case(rt, space, engine, params, trainer, reference_backbone, weight_batches, gate_batches) -> dict:
    gates = trainer.gates
    ref_ctx = supernet(reference_backbone, rt, space)
    freeze_backbone(reference_backbone)
    ref_module = DeltaModel(reference_backbone, rt.objective, ref_ctx)
    ref_params = [p for p in ref_module.parameters() if p.requires_grad]
    with torch.no_grad():
        for r, p in zip(ref_params, params, strict=True):
            r.copy_(p.float())
    # the reference: a plain fp32 model and a torch AdamW holding the engine's moments
    ref_opt = torch.optim.AdamW(ref_params, lr=LR, weight_decay=WEIGHT_DECAY)
    kinds = ["sgd"]
    if hasattr(zero, "adamw_state") and "virtual_step" in inspect.signature(BiLevel).parameters:
        kinds.append("adamw")
        state = zero.adamw_state(engine, params)
        for r, m, v in zip(ref_params, state.exp_avg, state.exp_avg_sq, strict=True):
            ref_opt.state[r] = {"step": torch.tensor(float(state.step)), "exp_avg": m, "exp_avg_sq": v}
    ref_engine = SimpleNamespace(module=ref_module, get_lr=engine.get_lr, basic_optimizer=ref_opt, optimizer=ref_opt)
    ref_gates = gates_for(rt, space)
    report = {"layout": "ok"}
    wrapper = engine.optimizer
    if hasattr(wrapper, "fp32_groups"):  # stage 0 bf16: the master copies zero.adamw_state pairs up
        for lp, hp in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True):
            for p, m in zip(lp, hp, strict=True):
                if not torch.equal(m.to(p.dtype), p.detach()):
                    report["layout"] = "master weights do not line up with the parameters"
        report["layout_checked"] = sum(len(g) for g in wrapper.fp16_groups)
    before = [p.detach().clone() for p in params]
    for kind in kinds:
        got = logit_grad(make_bilevel(engine, gates, kind, rt.device), gates, weight_batches, gate_batches)
        ref = logit_grad(make_bilevel(ref_engine, ref_gates, kind, rt.device), ref_gates, weight_batches, gate_batches)
        first = logit_grad(trainer, gates, weight_batches, gate_batches, second_order=False)
        ref_first = logit_grad(
            make_bilevel(ref_engine, ref_gates, "sgd", rt.device), ref_gates, weight_batches, gate_batches, False
        )
        report[kind] = {
            "rel_error": rel(got, ref),
            "first_order_rel_error": rel(first, ref_first),
            "correction_vs_first_order": rel(ref, ref_first),
        }
    report["params_unchanged"] = all(torch.equal(a, p.detach()) for a, p in zip(before, params, strict=True))
    return report


def moments_case(engine, params, trainer, weight_batches) -> dict:
    trainer = make_bilevel(engine, trainer.gates, "adamw", trainer.device)
    state = zero.adamw_state(engine, params)
    z_leaf = trainer.gates.sample(0, GATE_PHASE).detach().requires_grad_(True)
    items = trainer._global_items(weight_batches)
    w = [p.detach().float() for p in params]
    _, g, _ = trainer._z_grad(weight_batches, z_leaf, items, w, want_w=True)
    xi = float(engine.get_lr()[0])
    virtual = trainer.virtual_weights(w, g, xi)
    report = {
        "names": trainer.delta_names,
        "step": state.step,
        "lr": xi,
        "exp_avg": [m.tolist() for m in state.exp_avg],
        "exp_avg_sq": [v.tolist() for v in state.exp_avg_sq],
        "virtual": [v.tolist() for v in virtual],
    }
    if zero.world() == 1 and engine.optimizer is engine.basic_optimizer:  # stage 0: step a real AdamW
        copies = [torch.nn.Parameter(x.clone()) for x in w]
        opt = torch.optim.AdamW(copies, lr=xi, weight_decay=WEIGHT_DECAY, foreach=False)
        for c, p, gi in zip(copies, params, g, strict=True):
            opt.state[c] = copy.deepcopy(engine.basic_optimizer.state[p])
            c.grad = gi.clone()
        opt.step()
        report["torch_adamw"] = [c.detach().tolist() for c in copies]
    return report


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, case, extra = Path(args[0]), args[1], args[2:]
    overrides = [
        f"output_dir={out.parent / ('run_' + out.stem)}",
        "overwrite=true",
        "model.name_or_path=tiny-t5",
        "data.task=tiny-sentiment",
        f"model.dtype={'bf16' if case == 'bf16' else 'fp32'}",
        "search.grad_accum=1",
        "data.max_train_examples=64",
        "data.max_eval_examples=8",
        "deepspeed=zero2",
        *extra,
    ]
    cfg = load_run_config(None, overrides)
    rt = prepare(cfg, cfg.search, resume=False, kind="probe")
    space = rt.backbone.space("mixed")
    reference_backbone = copy.deepcopy(rt.model).float() if case == "bf16" else None
    ctx = supernet(rt.model, rt, space)
    cast_deltas(rt.model, next(rt.model.parameters()).dtype)
    freeze_backbone(rt.model)
    module = DeltaModel(rt.model, rt.objective, ctx)
    params = [p for p in module.parameters() if p.requires_grad]
    engine = zero.build_engine(
        module, params, lr=LR, weight_decay=WEIGHT_DECAY, total_steps=1000, ds_config=rt.ds_config
    )
    module.train()

    w_half, g_half = split_halves(rt.data["train"], 0)
    mb = cfg.search.micro_batch_size
    ws = BatchStream(w_half, micro_batch=mb, grad_accum=1, rank=rt.rank, world=rt.world, seed=0, collate=rt.collate)
    gs = BatchStream(g_half, micro_batch=mb, grad_accum=1, rank=rt.rank, world=rt.world, seed=1, collate=rt.collate)
    trainer = make_bilevel(engine, gates_for(rt, space), "sgd", rt.device)
    for step in range(STEPS):  # real delta steps: AdamW moments, and LoRA B no longer zero
        trainer.delta_step(ws.next(), step)
    weight_batches, gate_batches = ws.next(), gs.next()
    report = {"world": rt.world, "stage": zero.zero_stage(rt.ds_config), "dtype": str(params[0].dtype)}
    if case == "bf16":
        report.update(bf16_case(rt, space, engine, params, trainer, reference_backbone, weight_batches, gate_batches))
    else:
        report.update(moments_case(engine, params, trainer, weight_batches))
    if rt.rank == 0:
        out.write_text(json.dumps(report))
    zero.barrier()


if __name__ == "__main__":
    main()
