"""What a LoRA variant or a preference method costs in a cohort (GPU): step time and peak memory against plain LoRA.

    python -P bench/bench_variants.py --shape 1b [--jobs 8] [--variants rslora,loraplus,dora,vera,dpo,lopa] [--out DIR]
    python -P bench/bench_variants.py --shape tiny --device cpu --warmup 1 --steps 1   # smoke run of the whole script

One random-init Llama base (bench_e2e's shapes), a cohort of --jobs jobs of 4x512 tokens each (r=16, all 7
projections, AdamW). For each variant V it times three cohorts of the same size and tokens:
- `lora`: every job plain LoRA (the reference row, run once);
- `one`: one job V, the others plain LoRA (what a tenant's choice costs the cohort it shares);
- `all`: every job V.
The variants: rsLoRA (only the scale differs), LoRA+ (only the optimizer's groups differ), DoRA (its rows go through
the PyTorch path of executor/dora.py beside the Triton kernels of the other jobs), VeRA (each step its factors
are formed from the shared frozen matrices and the job's vectors, then the same kernels), DPO (pairs of 2 x 512 tokens, 2 pairs a micro-batch: the same 2,048
tokens, plus the no-grad reference forward of the base over them), SimPO and ORPO (pairs, no reference forward),
LoPA (no adapted layer: its soft prompts fed with the input embeddings, 10 rows more per sequence; a cohort holding
one steps eagerly, without the CUDA graph).
Step times are medians of --steps timed steps after --warmup, synchronised, host included.
Results go to OUT/variants_<shape>.json as they come, and a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import (  # noqa: E402  (bench scripts import each other from their folder)
    PROJECTIONS,
    SHAPES,
    build_base,
    matmul_peak_tflops,
    peak_gib,
    release,
    remove_jobs,
    timed_steps,
    write_job_data,
)

BATCH = "4x512"
PAIRS_PER_BATCH = 2  # two pairs of two 512-token sequences: the 2,048 tokens of a 4x512 SFT micro-batch
ADAPTERS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "loraplus": {"loraplus_lr_ratio": 16.0},
    "dora": {"use_dora": True},
    "vera": {"type": "vera"},
    "lopa": {"type": "lopa"},  # its defaults: 10 prompt rows before each sequence, rank 1, heads of 256
}
METHODS = ("dpo", "simpo", "orpo")  # preference methods: their jobs train on pairs


def write_pair_data(directory: Path, job: int, vocab: int) -> Path:
    """Preference records whose chosen and rejected sequences are 512 tokens each (a 256-token shared prompt)."""
    rng = random.Random(f"pairs/{job}")
    words = lambda n: " ".join(f"t{rng.randrange(1, vocab)}" for _ in range(n))  # noqa: E731
    path = directory / f"pairs-{job}.jsonl"
    with open(path, "w") as handle:
        for _ in range(PAIRS_PER_BATCH):
            record = {"prompt": words(256) + " ", "chosen": words(255), "rejected": words(255)}
            handle.write(json.dumps(record) + "\n")
    return path


def variant_spec(model_dir: Path, variant: str, job: int):
    from lorafleet.scheduler.spec import parse_spec

    preference = variant in METHODS
    adapter = ADAPTERS.get(variant, {})
    if adapter.get("type") != "lopa":  # a LoPA job adapts no layer: it takes no LoRA options
        adapter = {"r": 16, "lora_alpha": 32, "target_modules": list(PROJECTIONS), **adapter}
    return parse_spec({
        "base_model": str(model_dir),
        "dataset": "unused",
        "method": variant if preference else "sft",
        "adapter": adapter,
        "hyperparameters": {"batch_size": PAIRS_PER_BATCH if preference else 4, "max_seq_len": 1024,
                            "max_steps": 100_000, "seed": job},
    })


def time_cohort(cohort, model_dir, data_dir, variants: list[str], warmup, steps, device) -> dict:
    """Median step seconds and peak GiB of a cohort whose job i trains `variants[i]`."""
    release(device)
    try:
        for job, variant in enumerate(variants):
            data = data_dir / (f"pairs-{job}.jsonl" if variant in METHODS else f"{BATCH}-{job}.jsonl")
            cohort.add_job(f"job-{job}", variant_spec(model_dir, variant, job), data)
        seconds = timed_steps(cohort, warmup, steps, device)
        return {"seconds": seconds, "peak_gib": peak_gib(device), "tokens": cohort.step_tokens}
    finally:
        remove_jobs(cohort, device)


def supported(variant: str) -> bool:
    """Whether this checkout's spec has the variant (a method added later is skipped by older checkouts)."""
    from lorafleet.scheduler.spec import SpecError

    try:
        variant_spec(Path("unused"), variant, 0)
    except SpecError:
        return False
    return True


def markdown_table(report: dict) -> str:
    base = report["rows"][0]
    lines = ["| variant | cohort | step s | x plain LoRA | tok/s | peak GiB |", "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        ratio = row["seconds"] / base["seconds"]
        peak = "" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
        lines.append(f"| {row['variant']} | {row['cohort']} | {row['seconds']:.3f} | {ratio:.2f} | "
                     f"{row['tokens'] / row['seconds']:,.0f} | {peak} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=("tiny", "1b", "8b"), default="1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--variants", default="rslora,loraplus,dora,vera,dpo,simpo,orpo,lopa")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workdir", default="/tmp/lorafleet-variants")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()

    from lorafleet.executor.cohort import Cohort

    device = torch.device(args.device)
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(ADAPTERS) - set(METHODS):
        parser.error(f"--variants: unknown {sorted(unknown)}")
    workdir, out = Path(args.workdir), Path(args.out)
    model_dir, data_dir = workdir / args.shape, workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    vocab = SHAPES[args.shape]["vocab_size"]
    started = time.perf_counter()
    report = {"shape": args.shape, "jobs": args.jobs, "batch": BATCH, "device": torch.cuda.get_device_name()
              if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "peak_tflops": matmul_peak_tflops(device),
              "skipped": [], "rows": []}

    def record(variant, cohort_kind, measured):
        report["rows"].append({"variant": variant, "cohort": cohort_kind, **measured})
        (out / f"variants_{args.shape}.json").write_text(json.dumps(report, indent=1))
        print(f"[{time.perf_counter() - started:6.1f}s] {variant} {cohort_kind}: {measured}", flush=True)

    build_base(args.shape, model_dir, device)
    for job in range(args.jobs):
        write_job_data(data_dir, BATCH, job, vocab)
        write_pair_data(data_dir, job, vocab)
    cohort = Cohort(model_dir, device=args.device)
    record("lora", "all", time_cohort(cohort, model_dir, data_dir, ["lora"] * args.jobs, args.warmup, args.steps,
                                      device))
    for variant in variants:
        if not supported(variant):
            report["skipped"].append(variant)
            print(f"{variant}: not in this checkout's spec, skipped", flush=True)
            continue
        one = [variant] + ["lora"] * (args.jobs - 1)
        record(variant, "one", time_cohort(cohort, model_dir, data_dir, one, args.warmup, args.steps, device))
        record(variant, "all", time_cohort(cohort, model_dir, data_dir, [variant] * args.jobs, args.warmup,
                                           args.steps, device))
    table = markdown_table(report)
    (out / f"variants_{args.shape}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
