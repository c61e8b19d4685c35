"""Step time of a frozen backbone with trainable deltas, every variant in one process on the same data.

    python benchmarks/step.py --shape tiny                      # CPU, 1 rank
    deepspeed --num_gpus 2 benchmarks/step.py --shape base      # 2 ranks (CPU: DS_ACCELERATOR=cpu)
    deepspeed --num_gpus 1 benchmarks/step.py --shape xxl       # one GPU

Variants (LoRA r=8 on q,v for a, b, c; the `mixed` space for d, e):
  a  plain PyTorch + PEFT LoRA (no DeepSpeed)
  b  HF PEFT + stock DeepSpeed ZeRO-3 (HF's "auto" thresholds)
  c  s3delta_ds retrain step, ZeRO-3            c2  the same with deepspeed=auto (replicated backbone: ZeRO-2)
  d  s3delta_ds first-order search step, ZeRO-3 d2  the same with deepspeed=auto
  e  second-order search step (ZeRO-2: it needs replicated weights)
--gradient-checkpointing on|both runs them (also) with the backbone's blocks checkpointed, as
model.gradient_checkpointing=true does (rows KEY+ckpt, ratios KEY+ckpt/KEY). "step memory" is the
peak allocated during one extra step above what was allocated before it (``step_memory``).
Reports median step time, tokens/s, MFU (model FLOPs of the step, ``benchmarks/flops.py``: encoder
weights on source tokens, decoder weights on target tokens, attention products, one pass per
forward+backward through the backbone, against the best matmul measured in the same run with its
dtype and threads; never above 100%), peak memory, frozen-backbone bytes per rank, and the ratios
c/a, d/c, e/c, c2/c, d2/d. Writes JSON and markdown under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.contention import contention, contention_note, warn_if_contended  # noqa: E402
from benchmarks.flops import PASSES, matmul_peak, pass_flops  # noqa: E402
from s3delta_ds.backbones.checkpointing import enable_activation_checkpointing  # noqa: E402
from s3delta_ds.backbones.loading import build_model, load_config  # noqa: E402
from s3delta_ds.engine import zero  # noqa: E402
from s3delta_ds.engine.bilevel import BiLevel, delta_update  # noqa: E402
from s3delta_ds.engine.gatelogits import GateLogits  # noqa: E402
from s3delta_ds.method.supernet import DeltaSpec, GateContext  # noqa: E402
from s3delta_ds.recipes.pipeline import build_pipeline  # noqa: E402
from s3delta_ds.structure.builders import Backbone, manual  # noqa: E402
from s3delta_ds.util import atomic_write_text  # noqa: E402

SHAPES = {
    "tiny": "tiny-t5-v1_1",
    "base": "t5-v1_1-base",
    "large": "t5-v1_1-large",
    "xl": "t5-v1_1-xl",
    "xxl": "t5-v1_1-xxl",
    "llama-7b": "llama-2-7b",
}
RESULTS = ROOT / "benchmarks" / "results"
CKPT = {"off": (False,), "on": (True,), "both": (False, True)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def batch_for(config, batch: int, src: int, tgt: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(zero.rank())
    ids = torch.randint(3, min(config.vocab_size, 30000), (batch, src), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if config.is_encoder_decoder:
        labels = torch.randint(3, min(config.vocab_size, 30000), (batch, tgt), generator=g)
        dec = torch.zeros_like(labels)
        dec[:, 1:] = labels[:, :-1]
        out |= {"labels": labels, "decoder_input_ids": dec}
    else:
        out["labels"] = ids.clone()
    return {k: v.to(device) for k, v in out.items()}


def ds_config(stage: int, micro: int, dtype: str, hidden: int, *, hf_auto: bool = False) -> dict:
    template, _ = zero.read_ds_config("zero3" if stage == 3 else "zero2")
    cfg = zero.resolve_ds_config(
        template,
        micro_batch=micro,
        grad_accum=1,
        world=zero.world(),
        clip=2.0,
        dtype=dtype,
        hidden_size=hidden,
        zero_stage=stage,
        local_world=zero.local_world_size(),
    )
    if hf_auto and stage == 3:  # what HF's Trainer fills in for "auto"
        cfg["zero_optimization"].update(
            stage3_param_persistence_threshold=10 * hidden, stage3_prefetch_bucket_size=int(0.9 * hidden * hidden)
        )
    return cfg


def fresh_model(shape: str, dtype: torch.dtype, ckpt: bool = False):
    """A random-init backbone, built directly on the run's device (an 11B model initialised on the
    CPU would take minutes per variant)."""
    torch.manual_seed(0)
    model = build_model(load_config(SHAPES[shape]), device=zero.device())
    model.requires_grad_(False)
    if ckpt:  # what model.gradient_checkpointing=true does to the backbone
        enable_activation_checkpointing(model)
    return model.to(dtype)


def time_steps(step, n: int, warmup: int, device) -> list[float]:
    times = []
    for i in range(warmup + n):
        sync(device)
        t0 = time.perf_counter()
        step(i)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def peak_memory(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step_memory(step, device) -> int:
    """Peak bytes allocated during one step above what was allocated when it began: saved
    activations (with checkpointing: the block inputs, and one block's activations while it is
    recomputed), gradients, ZeRO-3 gathers and temporaries; not the resident weights or optimizer
    state. GPU: ``torch.cuda.max_memory_allocated``. CPU: torch's allocator keeps no peak, so the
    allocation and free events of the profiler (``profile_memory``) are summed in time order."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak


def variant_peft_plain(shape, dtype, batch, device, ckpt=False):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(fresh_model(shape, dtype, ckpt), LoraConfig(r=8, lora_alpha=16, target_modules=_qv(shape)))
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(_):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, None


def variant_peft_zero3(shape, dtype, batch, device, micro, dtype_name, ckpt=False):
    import deepspeed
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(fresh_model(shape, dtype, ckpt), LoraConfig(r=8, lora_alpha=16, target_modules=_qv(shape)))
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(params, lr=1e-4),
        config=ds_config(
            3,
            micro,
            dtype_name,
            model.config.d_model if hasattr(model.config, "d_model") else model.config.hidden_size,
            hf_auto=True,
        ),
    )

    def step(_):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()

    return step, engine


def _qv(shape: str) -> list[str]:
    return ["q_proj", "v_proj"] if shape.startswith("llama") else ["q", "v"]


def variant_s3delta(
    shape, dtype, batch, device, micro, dtype_name, *, stage: int, search: bool, mode="first-order", ckpt=False
):
    """The recipes' own assembly (``build_pipeline``) on a random-init backbone of ``shape``."""
    model = fresh_model(shape, dtype, ckpt)
    plan = Backbone.from_model(model, SHAPES[shape])
    ctx = GateContext() if search else None
    if search:
        space = plan.space("mixed")
        specs = [DeltaSpec(c.site, c.type, c.kwargs, c.index) for c in space.candidates]
    else:
        specs = manual(plan, "lora").specs()
    pipe = build_pipeline(
        model,
        plan.site_map,
        specs,
        objective="seq2seq" if model.config.is_encoder_decoder else "causal",
        dtype=dtype,
        ds_config=ds_config(stage, micro, dtype_name, plan.family.hidden_size(plan.config)),
        lr=1e-4,
        weight_decay=0.0,
        total_steps=10**6,
        seed=0,
        head=plan.family.head_modules,
        ctx=ctx,
    )
    engine, module, frozen = pipe.engine, pipe.module, pipe.frozen_bytes_rank0
    micro_batches = [batch]
    if not search:
        return (lambda i: delta_update(engine, module, micro_batches, device)), engine, frozen
    gates = GateLogits(
        space.params,
        0.1 * space.total_params,
        lr=0.1,
        clip=2.0,
        total_steps=10**6,
        beta=1.0,
        temperature=1.0,
        seed=0,
        device=device,
    )
    bilevel = BiLevel(engine, gates, mode=mode, device=device)
    return (lambda i: bilevel.step(micro_batches, micro_batches, i)), engine, frozen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=None, help="per-rank batch (default 16 on GPU, 4 on CPU)")
    p.add_argument("--src", type=int, default=None, help="source tokens (default 256 GPU, 64 CPU)")
    p.add_argument("--tgt", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default="a,b,c,c2,d,d2,e")
    p.add_argument(
        "--gradient-checkpointing",
        choices=sorted(CKPT),
        default="off",
        help="activation checkpointing of the backbone's blocks (model.gradient_checkpointing): off, on, or both "
        "(each variant twice; the checkpointed row is KEY+ckpt)",
    )
    p.add_argument("--out", default=None)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    zero.init_distributed()
    machine = contention()
    if zero.rank() == 0:
        warn_if_contended(machine)
    device = zero.device()
    gpu = device.type != "cpu"
    dtype_name = "bf16" if gpu else "fp32"
    dtype = torch.bfloat16 if gpu else torch.float32
    bsz, src = args.batch or (16 if gpu else 4), args.src or (256 if gpu else 64)
    config = load_config(SHAPES[args.shape])
    batch = batch_for(config, bsz, src, args.tgt, device)
    n_params = Backbone.plan(SHAPES[args.shape]).info.num_params
    tokens = bsz * (src + (args.tgt if config.is_encoder_decoder else 0))
    peak = matmul_peak(device, dtype, lambda: sync(device))
    flops_per_pass = pass_flops(build_model(config, device="meta"), bsz, src, args.tgt)
    auto_name, auto_reason = zero.choose_strategy(int(n_params * (2 if gpu else 4)), 0, zero.device_memory_bytes())
    auto_stage = 2 if auto_name == "zero2" else 3
    builders = {
        "a": (
            "plain PyTorch + PEFT LoRA",
            lambda ckpt: variant_peft_plain(args.shape, dtype, batch, device, ckpt) + (None,),
        ),
        "b": (
            "PEFT + stock DeepSpeed ZeRO-3",
            lambda ckpt: variant_peft_zero3(args.shape, dtype, batch, device, bsz, dtype_name, ckpt) + (None,),
        ),
        "c": (
            "s3delta retrain, ZeRO-3",
            lambda ckpt: variant_s3delta(
                args.shape, dtype, batch, device, bsz, dtype_name, stage=3, search=False, ckpt=ckpt
            ),
        ),
        "c2": (
            f"s3delta retrain, deepspeed=auto (ZeRO-{auto_stage})",
            lambda ckpt: variant_s3delta(
                args.shape, dtype, batch, device, bsz, dtype_name, stage=auto_stage, search=False, ckpt=ckpt
            ),
        ),
        "d": (
            "s3delta search (first order), ZeRO-3",
            lambda ckpt: variant_s3delta(
                args.shape, dtype, batch, device, bsz, dtype_name, stage=3, search=True, ckpt=ckpt
            ),
        ),
        "d2": (
            f"s3delta search (first order), deepspeed=auto (ZeRO-{auto_stage})",
            lambda ckpt: variant_s3delta(
                args.shape, dtype, batch, device, bsz, dtype_name, stage=auto_stage, search=True, ckpt=ckpt
            ),
        ),
        "e": (
            "s3delta search (second order), ZeRO-2",
            lambda ckpt: variant_s3delta(
                args.shape, dtype, batch, device, bsz, dtype_name, stage=2, search=True, mode="second-order", ckpt=ckpt
            ),
        ),
    }
    rows = {}
    out = Path(args.out or RESULTS / f"step-{args.shape}-w{zero.world()}-{'gpu' if gpu else 'cpu'}")
    for key, ckpt in [(k, c) for k in args.variants.split(",") for c in CKPT[args.gradient_checkpointing]]:
        name, build = builders[key]
        if key == "a" and zero.world() > 1:
            continue  # plain PyTorch has no data parallelism here: measured in single-rank runs
        step = None
        gc.collect()  # the previous variant's engine (DeepSpeed engines hold reference cycles)
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        zero.restore_functional_linear()  # a ZeRO-3 variant's linear swap would slow every later variant
        step, _, frozen = build(ckpt)
        times = time_steps(step, args.steps, args.warmup, device)
        med = statistics.median(times)
        # MFU counts model FLOPs: checkpointing's recomputation is overhead, not useful work
        row, name = (key + "+ckpt", name + " + activation checkpointing") if ckpt else (key, name)
        rows[row] = {
            "variant": name,
            "gradient_checkpointing": ckpt,
            "median_s": med,
            "tokens_per_s": tokens * zero.world() / med,
            "model_flops": PASSES[key] * flops_per_pass,
            "mfu": PASSES[key] * flops_per_pass / med / peak,
            "peak_memory_bytes": peak_memory(device),
            "step_memory_bytes": step_memory(functools.partial(step, args.warmup + args.steps), device),
            "frozen_bytes_per_rank": frozen,
        }
        if zero.rank() == 0:
            print(f"[step] {args.shape} {row}: {name}: {med:.4f}s", flush=True)
            facts = dict(gpu=gpu, dtype_name=dtype_name, n_params=n_params, bsz=bsz, tokens=tokens, peak=peak)
            facts["machine"] = machine
            write(out, result_of(args, rows, builders, flops_per_pass=flops_per_pass, auto_reason=auto_reason, **facts))
    if zero.rank() == 0:
        print(out.with_suffix(".md").read_text() if rows else "no variant ran")
    zero.destroy()
    return 0


def write(out: Path, result: dict) -> None:
    """The JSON and markdown, rewritten after every variant: a run stopped at a time limit (the GPU
    check) keeps what it measured."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), render(result))


def result_of(
    args, rows, builders, *, gpu, dtype_name, n_params, bsz, tokens, peak, flops_per_pass, auto_reason, machine=None
):
    ratio = lambda x, y: rows[x]["median_s"] / rows[y]["median_s"] if x in rows and y in rows else None  # noqa: E731
    return {
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "params": n_params,
        "world": zero.world(),
        "device": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
        "dtype": dtype_name,
        "batch_per_rank": bsz,
        "tokens_per_rank": tokens,
        "matmul_peak_flops": peak,
        "flops_per_pass": flops_per_pass,
        "auto_strategy": auto_reason,
        "contention": machine,
        "step_memory_source": "cuda" if gpu else "profiler",
        "variants": rows,
        "ratios": {
            "c/a": ratio("c", "a"),
            "b/a": ratio("b", "a"),
            "c/b": ratio("c", "b"),
            "d/c": ratio("d", "c"),
            "e/c": ratio("e", "c"),
            "c2/c": ratio("c2", "c"),
            "d2/d": ratio("d2", "d"),
            "d2/c2": ratio("d2", "c2"),
            **{f"{k}+ckpt/{k}": ratio(f"{k}+ckpt", k) for k in builders},
        },
    }


def render(r: dict) -> str:
    lines = [
        f"# Step time: {r['shape']} ({r['config']}, {r['params']:,} parameters), {r['world']} rank(s), "
        f"{r['device']}, {r['dtype']}",
        "",
        f"Per rank: batch {r['batch_per_rank']}, {r['tokens_per_rank']} tokens; matmul peak "
        f"{r['matmul_peak_flops'] / 1e12:.3f} TFLOP/s (measured). deepspeed=auto chose: {r['auto_strategy']}.",
        "",
        *([note, ""] if (note := contention_note(r.get("contention"))) else []),
        "| variant | median s/step | tokens/s | MFU | peak memory | step memory | frozen bytes/rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, v in r["variants"].items():
        lines.append(
            f"| {key}: {v['variant']} | {v['median_s']:.4f} | {v['tokens_per_s']:,.0f} | {100 * v['mfu']:.1f}% "
            f"| {v['peak_memory_bytes'] / 2**20:,.0f} MiB | {v['step_memory_bytes'] / 2**20:,.1f} MiB "
            f"| {v['frozen_bytes_per_rank'] or 0:,} |"
        )
    lines += ["", "Ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in r["ratios"].items() if v is not None)]
    if r.get("step_memory_source") == "profiler":
        lines += [
            "",
            "Step memory from the profiler's allocation events (CPU); the profiler's buffers also raise the "
            "process peak RSS (peak memory) of the rows after the first.",
        ]
    over = [k for k, v in r["variants"].items() if v["mfu"] > 1]
    if over:  # the FLOP count or the measured peak is wrong: say so rather than print it quietly
        lines += ["", f"**MFU above 100% for {', '.join(over)}: the measured matmul peak is too low (contention?)**"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
