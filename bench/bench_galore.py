"""GaLore against full-rank AdamW (GPU): optimizer-state bytes, peak memory and tokens/s of full-parameter training.

    python -P bench/bench_galore.py --shape 1b [--rank 512] [--update-proj-gap 200] [--steps 10] [--out DIR]
    python -P bench/bench_galore.py --shape tiny --device cpu --rank 8 --warmup 1 --steps 2   # smoke run

A random-init Llama of bench_e2e's shapes, every parameter trained (bf16 weights on a GPU, fp32 on a CPU), one
micro-batch of --batch random tokens per step through transformers' own forward and loss: a GaLore job trains the
base's weights, head included, so neither the cohort's LoRA kernels nor its chunked head loss (frozen heads only)
apply, and the micro-batch's full logits are part of the peak (the memory model does not count them). Two runs, each
on a fresh model, with executor/galore.py's GaLoreAdamW:
- adamw: no group projected: AdamW with the same fp32 moments, the full-rank reference;
- galore: the seven projections' weights projected (--rank, --update-proj-gap, scale 0.25, proj_type std), the
  embeddings, head and norms plain AdamW, as GaLore trains them.
Each row: the optimizer's state as measured (the storage of its tensors) and as the memory model counts it
(memory.galore_optimizer_bytes; no targets for adamw), the peak memory allocated over the steps next to the memory
model's whole job (memory.size_galore_job: weights + job bytes), the median step seconds after --warmup, one step
that refreshes the projections (its SVDs; a GaLore job pays it every update_proj_gap steps), and tokens/s with the
refreshes amortised. Results go to OUT/galore_<shape>.json, a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import SHAPES, peak_gib, release, sync  # noqa: E402  (bench scripts import each other from their folder)

from lorafleet.executor.galore import GaLoreAdamW, galore_param_groups  # noqa: E402
from lorafleet.scheduler.memory import ModelShape, galore_optimizer_bytes, size_galore_job  # noqa: E402

PROJECTIONS = ["all-linear"]
SCALE, PROJ_TYPE, LR = 0.25, "std", 1e-5


def build_model(shape: str, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], bos_token_id=None, eos_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.train()
    return model, ModelShape.from_config(config.to_dict())


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """What the optimizer keeps: the storage of every tensor of its state."""
    return sum(value.untyped_storage().nbytes() for state in optimizer.state.values() for value in state.values()
               if isinstance(value, torch.Tensor))


def timed_step(model, optimizer, ids: torch.Tensor, device) -> float:
    sync(device)
    start = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def refresh_seconds(model, optimizer, ids, device) -> float | None:
    """One step that refreshes every projection (update_proj_gap 1 for that step), or None without projections."""
    groups = [group for group in optimizer.param_groups if group["galore"] and group["params"]]
    if not groups:
        return None
    gaps = [group["update_proj_gap"] for group in groups]
    for group in groups:
        group["update_proj_gap"] = 1
    seconds = timed_step(model, optimizer, ids, device)
    for group, gap in zip(groups, gaps):
        group["update_proj_gap"] = gap
    return seconds


def run(name: str, args, device) -> dict:
    release(device)
    model, shape = build_model(args.shape, device)
    targets = PROJECTIONS if name == "galore" else []
    optimizer = GaLoreAdamW(galore_param_groups(model, targets), lr=LR, rank=args.rank,
                            update_proj_gap=args.update_proj_gap, scale=SCALE, proj_type=PROJ_TYPE)
    sequences, length = (int(n) for n in args.batch.split("x"))
    ids = torch.randint(1, shape.vocab_size, (sequences, length), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    seconds = [timed_step(model, optimizer, ids, device) for _ in range(args.warmup + args.steps)][args.warmup:]
    refresh = refresh_seconds(model, optimizer, ids, device)
    step = statistics.median(seconds)
    amortised = step if refresh is None else ((args.update_proj_gap - 1) * step + refresh) / args.update_proj_gap
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    planned = size_galore_job(shape, args.rank, PROJ_TYPE, targets, sequences, length, dtype)
    row = {
        "optimizer": name, "params": shape.num_params(),
        "state_gib": state_bytes(optimizer) / 2**30,
        "planned_state_gib": galore_optimizer_bytes(shape, args.rank, PROJ_TYPE, targets) / 2**30,
        "peak_gib": peak_gib(device), "planned_gib": (planned.base_bytes + planned.job_bytes) / 2**30,
        "step_s": step, "refresh_step_s": refresh, "tokens_per_s": sequences * length / amortised,
    }
    del model, optimizer
    release(device)
    return row


def table(rows: list[dict]) -> str:
    adamw = rows[0]["state_gib"]
    lines = ["| optimizer | state GiB (planned) | less than AdamW | peak GiB (planned) | step s | refresh step s | tok/s |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        refresh = "-" if row["refresh_step_s"] is None else f"{row['refresh_step_s']:.3f}"
        lines.append(f"| {row['optimizer']} | {row['state_gib']:.3f} ({row['planned_state_gib']:.3f}) | "
                     f"{1 - row['state_gib'] / adamw:.1%} | {peak} ({row['planned_gib']:.2f}) | {row['step_s']:.3f} | "
                     f"{refresh} | {row['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b", choices=[name for name in SHAPES if name != "70b"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--update-proj-gap", type=int, default=200)
    parser.add_argument("--batch", default="4x512", help="sequences x tokens of the micro-batch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = [run(name, args, device) for name in ("adamw", "galore")]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"galore_{args.shape}.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                                     "rows": rows}, indent=2))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
