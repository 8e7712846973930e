"""The memory model against the GPU, family by family: the peak a real cohort step allocates on large published shapes
next to what the scheduler plans for the same cohort (issue 17: within 10%).

    python -P bench/bench_memory_families.py --out DIR [--shapes llama-3.1-8b,gemma-2-9b] [--device cuda]
    python -P bench/bench_memory_families.py --tiny --device cpu --out DIR      # every family, tiny: a smoke run

Each shape is a published config typed in below, built with random weights in bf16 directly on the device (no
download, nothing saved: writing and reading back 9B parameters per shape would take most of the run) and handed to
a real `Cohort` in place of the directory `load_base` reads, with bench_e2e's word-level tokenizer over its
vocabulary. On it, two cohorts, each trained for --steps steps through `Cohort.step` (one pass, the Triton path):

- `lora`: --jobs LoRA jobs of --batch (e.g. 4x512: four sequences of 512 tokens), r 16 on all-linear;
- `mixed`: the same, but one job is DoRA and one DPO (its pairs of two --batch-long sequences, batch/2 pairs, so
  that it packs the same tokens as the others).

Measured: `torch.cuda.max_memory_allocated` over the steps, the base included (what an executor reports as its
peak). Planned: what the scheduler predicts for that cohort before calibration, sized exactly as submission sizes each
job (`memory.plan_job`, linear layers from the base's weights) and summed as the service's calibration does (base
bytes + `memory.cohort_bytes`). The ratio measured / planned is the calibration factor the scheduler would learn; the
issue asks for 0.9-1.1. Results go to OUT/memory_families.json (after each shape) and OUT/memory_families.md; a shape
or cohort that fails (out of memory, say) is a row with its error, and the run goes on.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import EOS_ID, save_tokenizer  # noqa: E402 (the word-level tokenizer whose words are the token ids)

R = 16
TARGETS = "all-linear"

# Published configs (the sizes that matter for memory), by the model's name.
SHAPES = {
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, sliding_window=None,
                       tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=False),
    "gemma-2-9b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                       query_pre_attn_scalar=256, sliding_window=4096),
    "gemma-3-4b": dict(model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=262208,
                       query_pre_attn_scalar=256, sliding_window=1024),
    "phi-3-mini": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, pad_token_id=0,
                       tie_word_embeddings=False),
    "phi-3-medium": dict(model_type="phi3", hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
                         num_attention_heads=40, num_key_value_heads=10, vocab_size=32064, pad_token_id=0,
                         tie_word_embeddings=False),
    "gpt2-xl": dict(model_type="gpt2", n_embd=1600, n_layer=48, n_head=25, n_positions=1024, vocab_size=50257),
    "qwen1.5-moe-a2.7b": dict(model_type="qwen2_moe", hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                              num_attention_heads=16, num_key_value_heads=16, vocab_size=151936, num_experts=60,
                              num_experts_per_tok=4, moe_intermediate_size=1408,
                              shared_expert_intermediate_size=5632, tie_word_embeddings=False),
}


def tiny(shape: dict) -> dict:
    """The shape's family at a tiny size (--tiny): the same code paths in seconds on a CPU."""
    if shape["model_type"] == "gpt2":
        return dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=512)
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512)
    for name, value in (("head_dim", 32), ("query_pre_attn_scalar", 32), ("moe_intermediate_size", 64),
                        ("shared_expert_intermediate_size", 64), ("num_experts", 4), ("num_experts_per_tok", 2)):
        if name in shape:
            sizes[name] = value
    return {**shape, **sizes}


def build_model(shape: dict, device: torch.device):
    """The shape with random weights in its compute dtype on the device, set up as `load_base` sets up a base."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorafleet.executor.model import PACKED_ATTENTION, compute_dtype

    fields = dict(shape)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, bos_token_id=None, eos_token_id=EOS_ID)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype("auto", device),
                                                 attn_implementation=PACKED_ATTENTION)
    model.requires_grad_(False)
    model.eval()
    return model


@contextmanager
def cohort_base(model, tokenizer):
    """Within: a `Cohort` takes `model` and `tokenizer` as its base instead of loading one from its directory."""
    from lorafleet.executor import cohort

    loader = cohort.load_base
    cohort.load_base = lambda *args, **kwargs: (model, tokenizer)
    try:
        yield
    finally:
        cohort.load_base = loader


def model_shape(model):
    """The memory model's view of the base, as submission reads it: the config's sizes and the linear layers by name
    (`base_modules.linear_widths` over the linear modules' weights, what it reads from the safetensors headers)."""
    import dataclasses

    from transformers.pytorch_utils import Conv1D

    from lorafleet.scheduler.base_modules import linear_widths
    from lorafleet.scheduler.memory import ModelShape

    weights = {f"{name}.weight": tuple(module.weight.shape) for name, module in model.named_modules()
               if isinstance(module, (torch.nn.Linear, Conv1D))}  # the bench's bases are not quantized
    config = json.loads(model.config.to_json_string(use_diff=False))
    return dataclasses.replace(ModelShape.from_config(config), modules=tuple(sorted(linear_widths(weights).items())))


def words(rng: random.Random, count: int, vocab: int) -> str:
    """`count` random tokens as text, their ids of one digit fewer than the largest id's: each word and its space
    are then no longer than the longest vocabulary entry, so a record cut to max_seq_len times that many characters
    (`formats.tokenise_example`) keeps all its tokens (word-level tokens carry no space, as byte-level ones do)."""
    return " ".join(f"t{rng.randrange(1, 10 ** (len(str(vocab - 1)) - 1))}" for _ in range(count))


def write_data(directory: Path, job: int, method: str, batch: tuple[int, int], vocab: int) -> Path:
    """One micro-batch of records of exactly `batch` = (sequences, tokens each): text records for SFT (the words and
    EOS), preference pairs for DPO (half the prompt and half the answer each)."""
    count, length = batch
    rng = random.Random(f"{job}/{method}")
    path = directory / f"{job}-{method}.jsonl"
    if method == "dpo":
        rows = [{"prompt": words(rng, length // 2, vocab), "chosen": " " + words(rng, length - length // 2 - 1, vocab),
                 "rejected": " " + words(rng, length - length // 2 - 1, vocab)} for _ in range(count // 2)]
    else:
        rows = [{"text": words(rng, length - 1, vocab)} for _ in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def cohort_jobs(kind: str, jobs: int) -> list[tuple[str, bool]]:
    """(method, DoRA?) of each job of a `lora` or `mixed` cohort."""
    mixed = [("sft", True), ("dpo", False)] if kind == "mixed" else []
    return mixed + [("sft", False)] * (jobs - len(mixed))


def job_spec(base_dir: Path, method: str, dora: bool, batch: tuple[int, int], steps: int, seed: int):
    from lorafleet.scheduler.spec import parse_spec

    count, length = batch
    return parse_spec({
        "base_model": str(base_dir), "dataset": "unused", "method": method,
        "adapter": {"r": R, "lora_alpha": 2 * R, "target_modules": TARGETS, "use_dora": dora},
        "hyperparameters": {"batch_size": count // 2 if method == "dpo" else count, "max_seq_len": length,
                            "max_steps": steps, "seed": seed},
    })


def planned_bytes(shape, specs: list, dtype: str) -> tuple[int, float]:
    """(base bytes, base + cohort bytes) the scheduler plans for these jobs, uncalibrated, in one pass."""
    from lorafleet.scheduler.memory import cohort_bytes, plan_job
    from lorafleet.scheduler.policy import RunningJob

    running = []
    for index, spec in enumerate(specs):
        hp = spec.hyperparameters
        plan = plan_job("bench", "bench", shape, spec.adapter.r, spec.adapter.target_modules, hp.batch_size,
                        hp.max_seq_len, spec.quantization, spec.dtype, hp.max_steps * hp.batch_size * hp.max_seq_len,
                        dora=spec.adapter.use_dora, method=spec.method)
        size = plan.sizes[dtype]
        running.append(RunningJob(str(index), "bench", size.job_bytes, plan.tokens_per_step, 0.0,
                                  size.activation_bytes, plan.max_seq_len))
    return size.base_bytes, size.base_bytes + cohort_bytes(running, None)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_cohort(cohort, kind: str, args, scratch: Path) -> dict:
    """Add a cohort of `kind` to the loaded `cohort`, train it for --steps steps and remove it again; its measured
    peak next to its planned bytes."""
    model, device = cohort.model, cohort.device
    batch = tuple(int(x) for x in args.batch.split("x"))
    vocab = model.config.get_text_config().vocab_size
    specs = []
    for job, (method, dora) in enumerate(cohort_jobs(kind, args.jobs)):
        specs.append(job_spec(scratch, method, dora, batch, args.steps, seed=job))
        cohort.add_job(f"job-{job}", specs[-1], write_data(scratch, job, method, batch, vocab))
    try:
        release(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            failed = [result.error for result in cohort.step().values() if result.error]
            if failed:
                raise RuntimeError(failed[0])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        step_tokens = cohort.step_tokens
    finally:
        for job_id in list(cohort.jobs):
            cohort.remove_job(job_id)
        release(device)
    dtype = "bfloat16" if next(model.parameters()).dtype == torch.bfloat16 else "float32"
    base_bytes, planned = planned_bytes(model_shape(model), specs, dtype)
    return {"cohort": kind, "jobs": args.jobs, "batch": args.batch, "step_tokens": step_tokens,
            "steps": args.steps, "seconds": seconds,
            "planned_base_bytes": base_bytes, "planned_bytes": round(planned), "peak_bytes": peak,
            "ratio": peak / planned if peak else None}


def run_shape(name: str, shape: dict, args, device: torch.device, scratch: Path) -> Iterator[dict]:
    """Build the shape, load it in a `Cohort` (one for both cohorts, as an executor keeps its base while jobs come
    and go) and measure each cohort on it."""
    from transformers import AutoTokenizer

    from lorafleet.executor.cohort import Cohort

    start = time.perf_counter()
    model = build_model(shape, device)
    scratch.mkdir(parents=True, exist_ok=True)  # the cohort's base names it: the tokenizer and the jobs' data
    save_tokenizer(scratch, model.config.get_text_config().vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(scratch)
    with cohort_base(model, tokenizer):
        cohort = Cohort(scratch, device=str(device))
    built = time.perf_counter() - start
    base_allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    for kind in ("lora", "mixed"):
        row = {"shape": name, "family": shape["model_type"], "base_allocated_bytes": base_allocated,
               "build_seconds": built}
        try:
            row.update(run_cohort(cohort, kind, args, scratch))
        except Exception as exc:  # out of memory, or a family's step failing: reported, and the run goes on
            traceback.print_exc()
            row.update(cohort=kind, error=error_text(exc))
        yield row
    del cohort, model
    release(device)


def gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.1f}"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| shape | family | cohort | jobs x batch | tokens/step | planned GiB (base) | measured peak GiB (base) "
             "| measured / planned |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['shape']} | {row['family']} | {row['cohort']} | | | | {row['error']} | |")
            continue
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        lines.append(f"| {row['shape']} | {row['family']} | {row['cohort']} | {row['jobs']} x {row['batch']} "
                     f"| {row['step_tokens']:,} "
                     f"| {gib(row['planned_bytes'])} ({gib(row['planned_base_bytes'])}) "
                     f"| {gib(row['peak_bytes'])} ({gib(row['base_allocated_bytes'])}) | {ratio} |")
    return "\n".join(lines)


def error_text(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def progress_line(row: dict) -> str:
    if "error" in row:
        return f"{row['shape']} {row['cohort']}: {row['error']}"
    ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
    return (f"{row['shape']} {row['cohort']}: planned {gib(row['planned_bytes'])} GiB, peak {gib(row['peak_bytes'])} "
            f"GiB, measured / planned {ratio}, {row['steps']} steps {row['seconds']:.1f} s")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--tiny", action="store_true", help="one tiny config per family instead of the real shapes")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--batch", default=None, help="sequences x tokens of each job's micro-batch (default 4x512; "
                                                      "--tiny: 2x32)")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    args.batch = args.batch or ("2x32" if args.tiny else "4x512")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    shapes = {name: tiny(shape) for name, shape in SHAPES.items()} if args.tiny else SHAPES
    names = args.shapes.split(",") if args.shapes else list(shapes)
    unknown = [name for name in names if name not in shapes]
    if unknown:
        sys.exit(f"unknown shape(s) {', '.join(unknown)}; expected some of {', '.join(shapes)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as scratch:  # tokenizers and data, not results
        for name in names:
            print(f"[{time.perf_counter() - start:6.1f} s] {name}: building", flush=True)
            try:
                for row in run_shape(name, shapes[name], args, device, Path(scratch) / name):
                    rows.append(row)
                    print(f"[{time.perf_counter() - start:6.1f} s] {progress_line(row)}", flush=True)
            except Exception as exc:  # the shape could not be built or loaded
                traceback.print_exc()
                rows.append({"shape": name, "family": shapes[name]["model_type"], "cohort": "-",
                             "error": error_text(exc)})
                print(f"[{time.perf_counter() - start:6.1f} s] {progress_line(rows[-1])}", flush=True)
                release(device)
            (args.out / "memory_families.json").write_text(json.dumps(rows, indent=2))
    (args.out / "memory_families.md").write_text(markdown_table(rows) + "\n")
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
