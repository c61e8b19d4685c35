"""Devices and dtypes on one CUDA GPU: the bf16 supernet, the dtype of the deltas, a DeepSpeed engine
on one GPU (NCCL, world of one) and the fp32 gate logits.

Run by ``benchmarks/gpu_check.sh`` (stage 01-unit) on a GPU machine; on the CPU every test is
skipped with the reason. The CPU suite checks the same maths in fp32 (test_supernet, test_distributed).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from s3delta_ds.backbones import SiteMap, family_for
from s3delta_ds.method.space import enumerate_space
from s3delta_ds.method.supernet import DeltaSpec, GateContext, attach, cast_deltas, delta_parameters

from .helpers import logits_of, tiny_inputs, tiny_model


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device (torch.cuda.is_available() is False); benchmarks/gpu_check.sh runs it on a GPU"
    accel = os.environ.get("DS_ACCELERATOR", "cuda")
    if accel != "cuda":
        return f"DS_ACCELERATOR={accel} makes DeepSpeed use that accelerator, not CUDA: unset it or set it to cuda"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")

CUDA = torch.device("cuda", 0)
BF16 = torch.bfloat16


def _on_cuda(batch: dict) -> dict:
    return {k: v.to(CUDA) for k, v in batch.items()}


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama"])
def test_bf16_supernet_on_cuda_with_gates_at_zero_is_the_frozen_backbone(name):
    model = tiny_model(name).to(CUDA, BF16)
    batch = _on_cuda(tiny_inputs(name))
    with torch.no_grad():
        reference = logits_of(model, batch)
    sm = SiteMap(model, family_for(model.config))
    space = enumerate_space(model, "mixed+adapter", site_map=sm)
    ctx = GateContext()
    torch.manual_seed(5)
    # attach builds the deltas on the CPU in fp32; the entry points cast them, DeepSpeed moves them
    attach(model, sm, [DeltaSpec(c.site, c.type, c.kwargs, c.index) for c in space.candidates], ctx)
    cast_deltas(model, BF16)
    model.to(CUDA)
    params = delta_parameters(model)
    assert params, "no deltas attached"
    assert {(p.dtype, p.device) for _, p in params} == {(BF16, CUDA)}
    with torch.no_grad():
        for _, p in params:  # non-zero deltas, so a gate that failed to switch one off would show
            p.normal_(0, 0.05)
        ctx.z = torch.zeros(len(space), device=CUDA)  # fp32 gates (as GateLogits makes them) on bf16 activations
        assert torch.equal(logits_of(model, batch), reference)
        ctx.z = torch.ones(len(space), device=CUDA)
        on = logits_of(model, batch)
    assert on.dtype == reference.dtype == BF16
    assert torch.isfinite(on).all()
    assert (on.float() - reference.float()).abs().max() > 1e-3


def test_gate_samples_are_fp32_on_cuda_and_equal_to_the_cpu_draw():
    from s3delta_ds.engine.gatelogits import GateLogits

    kwargs = dict(lr=0.1, clip=2.0, total_steps=10, beta=1.0, temperature=1.0, seed=3)
    gpu = GateLogits([10, 20, 30, 40], 50.0, device=CUDA, **kwargs)
    cpu = GateLogits([10, 20, 30, 40], 50.0, device=torch.device("cpu"), **kwargs)
    z = gpu.sample(step=2, phase=1)
    assert (z.dtype, z.device, gpu.logits.dtype) == (torch.float32, CUDA, torch.float32)
    # the noise is drawn on the CPU from a seeded generator: every rank, and every device, sees the same z
    torch.testing.assert_close(z.cpu(), cpu.sample(step=2, phase=1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shift_gradient", ["renormalise", "exact"])
def test_gate_gradients_on_cuda_equal_the_cpu_ones(shift_gradient):
    """search.shift_gradient=exact once multiplied the CPU parameter counts with CUDA logits."""
    from s3delta_ds.engine.gatelogits import GateLogits

    kwargs = dict(lr=0.1, clip=2.0, total_steps=10, beta=1.0, temperature=1.0, seed=3, shift_gradient=shift_gradient)
    grads = []
    for device in (CUDA, torch.device("cpu")):
        gates = GateLogits([10, 20, 30, 40], 50.0, device=device, **kwargs)
        with torch.no_grad():
            gates.logits.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))
        z = gates.sample(step=2, phase=1)
        (z * torch.tensor([1.0, -2.0, 0.5, 3.0], device=device)).sum().backward()
        grads.append(gates.logits.grad.cpu())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def process_group():
    """One NCCL process group (a world of one) for this module's engines; the environment the
    in-process setup writes (RANK, MASTER_PORT, ...) is put back afterwards."""
    saved = dict(os.environ)
    yield
    from s3delta_ds.engine import zero

    zero.destroy()
    os.environ.clear()
    os.environ.update(saved)


# zero3_cpu is the tests' ZeRO-3 config (persistence threshold 0, so a tiny model really is
# partitioned); nothing in it is CPU-specific.
@pytest.mark.parametrize("ds_config", ["zero2", "zero3_cpu"])
def test_deepspeed_engine_on_one_gpu_trains_bf16_deltas_and_fp32_gates(ds_config, tmp_path, process_group):
    from s3delta_ds.config import load_run_config
    from s3delta_ds.data import BatchStream, split_halves
    from s3delta_ds.engine import zero
    from s3delta_ds.engine.bilevel import BiLevel
    from s3delta_ds.engine.gatelogits import GateLogits
    from s3delta_ds.method.objective import DeltaModel
    from s3delta_ds.method.supernet import freeze_backbone
    from s3delta_ds.run.runtime import prepare

    cfg = load_run_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            "model.name_or_path=tiny-t5",
            "data.task=tiny-sentiment",
            "model.dtype=bf16",
            f"deepspeed={ds_config}",
            "search.micro_batch_size=4",
            "data.max_train_examples=64",
            "data.max_eval_examples=8",
        ],
    )
    rt = prepare(cfg, cfg.search, resume=False, kind="test_cuda")
    assert (rt.world, rt.device.type, rt.dtype) == (1, "cuda", "bf16")
    assert torch.distributed.get_backend() == "nccl"
    space = rt.backbone.space("mixed+pafi+hiwi")  # PaFi's index buffer must follow the deltas to the GPU
    ctx = GateContext()
    torch.manual_seed(0)
    attach(
        rt.model,
        rt.site_map,
        [DeltaSpec(c.site, c.type, c.kwargs, c.index) for c in space.candidates],
        ctx,
        gather=zero.gathered,
        register_external=zero.register_external,
    )
    cast_deltas(rt.model, BF16)
    freeze_backbone(rt.model)
    module = DeltaModel(rt.model, rt.objective, ctx)
    params = [p for p in module.parameters() if p.requires_grad]
    engine = zero.build_engine(module, params, lr=1e-2, weight_decay=0.0, total_steps=3, ds_config=rt.ds_config)
    gates = GateLogits(
        space.params,
        0.02 * rt.backbone.info.num_params,
        lr=0.1,
        clip=2.0,
        total_steps=3,
        beta=1.0,
        temperature=1.0,
        seed=0,
        device=rt.device,
    )
    bilevel = BiLevel(engine, gates, mode="first-order", device=rt.device)
    assert engine.bfloat16_enabled()
    assert zero.zero_stage(rt.ds_config) == (3 if ds_config == "zero3_cpu" else 2)

    trainable = [p for p in module.parameters() if p.requires_grad]
    frozen = [p for p in module.parameters() if not p.requires_grad]
    # the deltas follow the backbone's dtype and live on the GPU (ZeRO-3: their partitions do)
    assert {p.dtype for p in trainable} == {p.dtype for p in frozen} == {BF16}
    held = [p.ds_tensor if zero.is_partitioned(p) else p for p in trainable]
    assert {t.device.type for t in held} == {"cuda"}
    if ds_config == "zero3_cpu":
        assert all(zero.is_partitioned(p) for p in frozen)

    with zero.gathered(trainable):
        before = [p.detach().clone() for p in trainable]
    w, g = split_halves(rt.data["train"], 0)
    ws = BatchStream(w, micro_batch=4, grad_accum=1, rank=0, world=1, seed=0, collate=rt.collate)
    gs = BatchStream(g, micro_batch=4, grad_accum=1, rank=0, world=1, seed=1, collate=rt.collate)
    for step in range(3):
        stats = bilevel.step(ws.next(), gs.next(), step)
        assert all(math.isfinite(v) for v in stats.values()), stats
    with zero.gathered(trainable):
        moved = sum(not torch.equal(a, p) for a, p in zip(before, trainable, strict=True))
    assert moved > len(trainable) // 2, f"only {moved} of {len(trainable)} delta tensors changed"
    assert gates.logits.dtype == torch.float32 and gates.logits.device.type == "cuda"
    assert torch.isfinite(gates.logits).all() and gates.logits.abs().max() > 0
    assert torch.cuda.max_memory_allocated() > 0
    del engine, bilevel, module
    torch.cuda.empty_cache()


def test_api_attach_to_a_model_already_on_the_gpu_with_a_pafi_mask(tmp_path):
    """The Python API gets no DeepSpeed to move the deltas: they follow their hosts to the GPU,
    PaFi's index buffers included, and the mask's probe is compared on the CPU."""
    import s3delta_ds
    from s3delta_ds.structure.builders import Backbone
    from s3delta_ds.structure.pafi import compute_mask, load_mask, mask_structure, save_mask, weights_probe

    cpu = tiny_model("tiny-t5")
    sm = SiteMap(cpu, family_for(cpu.config))
    plan = Backbone.from_model(cpu, "tiny-t5")
    mask = compute_mask(cpu, sm, density=0.02)
    path = tmp_path / "mask.safetensors"
    probe = weights_probe(cpu, sm, mask)
    save_mask(mask, path, backbone=plan, density=0.02, ranking="global", eligible=("linear",), probe=probe)
    structure = mask_structure(plan, *load_mask(path, plan))
    model = tiny_model("tiny-t5").to(CUDA, BF16)
    s3delta_ds.attach(model, structure, pafi_mask=str(path))
    held = {b.device.type for name, b in model.named_buffers() if ".s3delta." in name}
    assert held == {"cuda"}
    assert {(p.dtype, p.device) for p in model.parameters() if p.requires_grad} == {(BF16, CUDA)}
    out = logits_of(model, _on_cuda(tiny_inputs("tiny-t5")))
    assert torch.isfinite(out).all()
