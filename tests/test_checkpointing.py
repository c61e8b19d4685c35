"""Activation checkpointing (``model.gradient_checkpointing``, backbones/checkpointing.py).

In-process, on tiny fp32 models with dropout on and every delta type attached: each block is
checkpointed and recomputes the deltas it holds in the backward; the gradients of the gate logits
and of every delta weight equal those without checkpointing (1e-5) for a first-order search step,
a second-order gate step (whose passes run on swapped weights) and a retrain step. Launched: a
2-rank ZeRO-3 search with checkpointing ends where the same search without it does.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from s3delta_ds.backbones import SiteMap, family_for
from s3delta_ds.backbones.checkpointing import checkpointed_blocks, enable_activation_checkpointing
from s3delta_ds.backbones.loading import build_model, load_config
from s3delta_ds.config import ModelConfig, build_run_config
from s3delta_ds.engine.bilevel import BiLevel, delta_update
from s3delta_ds.engine.gatelogits import GateLogits
from s3delta_ds.errors import ConfigError
from s3delta_ds.method.objective import DeltaModel
from s3delta_ds.method.space import enumerate_space
from s3delta_ds.method.supernet import DeltaSpec, GateContext, attach, delta_parameters, freeze_backbone, slots

from .helpers import tiny_inputs
from .launching import TINY, alphas, deltas, max_diff, run

CPU = torch.device("cpu")
TOL = 1e-5
OBJECTIVE = {"t5": "seq2seq", "llama": "causal", "bert": "classify"}
DROPOUT = {"t5": ("dropout_rate",), "llama": ("attention_dropout",), "bert": ("hidden_dropout_prob",)}
# together these hold every delta type: LoRA, BitFit, LNFit, LRA, adapters, IA3, PaFi, HiWi
SPACES = ("mixed+adapter", "mixed+ia3", "mixed+pafi+hiwi")


class FakeEngine:
    """What BiLevel and ``delta_update`` use of a DeepSpeed engine, in one process at stage 0;
    ``step`` leaves the gradients in ``.grad`` to be compared."""

    def __init__(self, module: DeltaModel, lr: float = 1e-2):
        self.module, self.lr = module, lr
        params = [p for p in module.parameters() if p.requires_grad]
        self.basic_optimizer = self.optimizer = torch.optim.AdamW(params, lr=lr, foreach=False)

    def __call__(self, batch):
        return self.module(batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        pass

    def gradient_accumulation_steps(self) -> int:
        return 1

    def get_lr(self) -> list[float]:
        return [self.lr]


def supernet(name: str, checkpointing: bool, gated: bool = True) -> tuple[DeltaModel, list[int]]:
    """``name`` with dropout 0.1 and every candidate of ``SPACES`` attached, every delta non-zero."""
    config = load_config(name)
    family = family_for(config)
    for key in DROPOUT[family.name]:
        setattr(config, key, 0.1)
    torch.manual_seed(0)
    model = build_model(config)
    if checkpointing:
        enable_activation_checkpointing(model)
    site_map = SiteMap(model, family)
    candidates = {}
    for space in SPACES:
        for c in enumerate_space(model, space, site_map=site_map).candidates:
            candidates.setdefault(c.key, c)
    specs = [DeltaSpec(c.site, c.type, c.kwargs, i if gated else None) for i, c in enumerate(candidates.values())]
    ctx = GateContext() if gated else None
    torch.manual_seed(1)
    attach(model, site_map, specs, ctx)
    with torch.no_grad():
        for _, p in delta_parameters(model):
            p.normal_(0, 0.05)
    freeze_backbone(model, family.head_modules)
    module = DeltaModel(model, OBJECTIVE[family.name], ctx)
    module.train()
    return module, [c.params for c in candidates.values()]


def batches(module: DeltaModel, name: str, seed: int) -> list[dict]:
    b = tiny_inputs(name, batch=2 if module.objective == "classify" else 4, seq=12, seed=seed)
    if module.objective == "seq2seq":
        b["decoder_input_ids"] = module.backbone._shift_right(b["labels"])
    return [b]


def gates_for(n_params: list[int]) -> GateLogits:
    gates = GateLogits(
        n_params, 0.1 * sum(n_params), lr=0.1, clip=0.0, total_steps=10, beta=1.0, temperature=1.0, seed=0, device=CPU
    )
    gates.grads = []
    apply = gates.apply

    def recording(grad):
        gates.grads.append(grad.detach().clone())
        apply(grad)

    gates.apply = recording
    return gates


def delta_grads(module: DeltaModel) -> dict[str, torch.Tensor]:
    out = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    assert all(g is not None for g in out.values()), [n for n, g in out.items() if g is None][:5]
    return {n: g.detach().clone() for n, g in out.items()}


def assert_equal(with_ckpt, without, what: str) -> None:
    assert set(with_ckpt) == set(without)
    for k, a in with_ckpt.items():
        assert (a - without[k]).abs().max() <= TOL, f"{what}: {k}"
    assert max(float(a.abs().max()) for a in without.values()) > 1e-4, f"{what}: nothing to compare"


def first_order_step(name: str, checkpointing: bool):
    module, n_params = supernet(name, checkpointing)
    gates = gates_for(n_params)
    bilevel = BiLevel(FakeEngine(module), gates, mode="first-order", device=CPU)
    torch.manual_seed(2)  # dropout
    bilevel.step(batches(module, name, 1), batches(module, name, 2), 0)  # gate step, then delta step
    return {"gate logits": gates.grads[0]}, delta_grads(module)


def second_order_gate_step(name: str, checkpointing: bool):
    module, n_params = supernet(name, checkpointing)
    gates, engine = gates_for(n_params), FakeEngine(module)
    bilevel = BiLevel(engine, gates, mode="second-order", device=CPU)
    gen = torch.Generator().manual_seed(3)
    for p in bilevel.delta_params:  # an optimizer with a history: non-zero AdamW moments
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    engine.optimizer.step()
    engine.optimizer.zero_grad(set_to_none=True)
    passes, z_grad = [], bilevel._z_grad

    def recording(*args, **kwargs):
        gz, gw, total = z_grad(*args, **kwargs)
        passes.append((gz, gw))
        return gz, gw, total

    bilevel._z_grad = recording
    torch.manual_seed(2)
    bilevel.gate_update(batches(module, name, 1), batches(module, name, 2), 0)
    out = {"gate logits": gates.grads[0]}
    for i, (gz, gw) in enumerate(passes):  # ∇w L_trn(w), ∇z,w L_val(w'), ∇z L_trn(w±)
        out[f"pass {i} z"] = gz
        out |= {f"pass {i} {n}": g for n, g in zip(bilevel.delta_names, gw or [], strict=False)}
    return out


def retrain_step(name: str, checkpointing: bool):
    module, _ = supernet(name, checkpointing, gated=False)
    torch.manual_seed(2)
    delta_update(FakeEngine(module), module, batches(module, name, 1), CPU)
    return delta_grads(module)


# -- the switch --------------------------------------------------------------------------------


def test_config_key_defaults_off_and_is_a_bool():
    assert ModelConfig().gradient_checkpointing is False
    assert build_run_config({}, ["model.gradient_checkpointing=true"]).model.gradient_checkpointing is True
    with pytest.raises(ConfigError, match="model.gradient_checkpointing must be bool"):
        build_run_config({}, ["model.gradient_checkpointing=2"])


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama", "tiny-bert"])
def test_every_block_is_checkpointed_and_recomputes_its_deltas(name):
    module, n_params = supernet(name, checkpointing=True)
    layers = {"t5": 4, "llama": 2, "bert": 2}  # tiny-t5: 2 encoder + 2 decoder blocks
    family = family_for(module.backbone.config).name
    depth = sum(SiteMap(module.backbone, family_for(module.backbone.config)).depths.values())
    assert checkpointed_blocks(module.backbone) == depth == layers[family]
    assert checkpointed_blocks(supernet(name, checkpointing=False)[0].backbone) == 0
    # non-reentrant needs no input that requires grad: transformers' embedding hook is removed
    assert not getattr(module.backbone, "_require_grads_hooks", None)
    calls = []
    for site, slot in slots(module.backbone).items():  # pre-hooks: the recomputation stops early,
        for delta in slot.deltas.values():  # after the last tensor it needs
            delta.register_forward_pre_hook(lambda m, a, site=site: calls.append(site))
    module.gate_ctx.z = torch.full((len(n_params),), 0.5)
    batch = batches(module, name, 1)[0]
    loss = module(batch)[0].sum()
    forward = list(calls)
    loss.backward()
    in_blocks = [s for s in forward if "final_norm" not in s]
    assert in_blocks and sorted(calls) == sorted(forward + in_blocks)  # recomputed once, in the backward
    calls.clear()
    module.eval()
    with torch.no_grad():
        module(batch)
    assert len(calls) == len(forward)  # evaluation does not checkpoint


# -- gradients with and without ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama"])
def test_first_order_search_step_gradients_are_unchanged(name):
    gates_on, deltas_on = first_order_step(name, True)
    gates_off, deltas_off = first_order_step(name, False)
    assert_equal(gates_on, gates_off, "gate logits")
    assert_equal(deltas_on, deltas_off, "delta weights")


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama"])
def test_second_order_gate_step_gradients_are_unchanged(name):
    # its passes swap the weights with functional_call: the recomputation must see the swap too
    assert_equal(second_order_gate_step(name, True), second_order_gate_step(name, False), "second order")


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama", "tiny-bert"])
def test_retrain_step_gradients_are_unchanged(name):
    assert_equal(retrain_step(name, True), retrain_step(name, False), "retrain")


# -- launched ------------------------------------------------------------------------------------

ZERO3 = [*TINY, "zero_stage=3", "search.micro_batch_size=2", "retrain.micro_batch_size=2", "retrain.log_every=1"]
ON = "model.gradient_checkpointing=true"


def losses(run_dir, phase: str, keys: tuple[str, ...]) -> list[tuple[float, ...]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [tuple(r[k] for k in keys) for r in rows if r["phase"] == phase]


def assert_same_losses(on, off, phase: str, keys: tuple[str, ...]) -> None:
    a, b = losses(on, phase, keys), losses(off, phase, keys)
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)) < TOL


@pytest.fixture(scope="module")
def searches(tmp_path_factory, zero3_search):
    """The same 2-rank ZeRO-3 search with and without checkpointing (without: the session's shared
    run, conftest.zero3_search, which ZERO3's search settings equal; its retrain.* keys do not
    touch a search)."""
    root = tmp_path_factory.mktemp("ckpt")
    on = run("deepspeed", "search", [*ZERO3, ON, f"output_dir={root / 'on'}"])
    assert "activation checkpointing on 4 blocks" in on.stdout  # tiny-t5: 2 encoder + 2 decoder blocks
    shared = yaml.safe_load((zero3_search / "config.yaml").read_text())
    assert not shared["model"].get("gradient_checkpointing") and shared["zero_stage"] == 3
    return root / "on", zero3_search


@pytest.mark.distributed
def test_zero3_search_with_checkpointing_ends_where_the_search_without_does(searches):
    on, off = searches
    assert alphas(off).abs().max() > 1e-3  # the gates really moved
    assert_same_losses(on, off, "search", ("delta_loss", "gate_loss"))
    assert (alphas(on) - alphas(off)).abs().max() < TOL
    assert max_diff(deltas(on / "supernet_deltas.safetensors"), deltas(off / "supernet_deltas.safetensors")) < TOL


@pytest.mark.distributed
def test_zero3_retrain_with_checkpointing_ends_where_the_retrain_without_does(searches, tmp_path):
    structure = f"retrain.structure={searches[1] / 'structure.json'}"
    run("deepspeed", "retrain", [*ZERO3, structure, ON, f"output_dir={tmp_path / 'on'}"])
    run("deepspeed", "retrain", [*ZERO3, structure, f"output_dir={tmp_path / 'off'}"])
    on, off = tmp_path / "on", tmp_path / "off"
    assert_same_losses(on, off, "retrain", ("loss",))
    assert max_diff(deltas(on / "deltas.safetensors"), deltas(off / "deltas.safetensors")) < TOL
