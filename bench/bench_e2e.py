"""End-to-end GPU benchmark: cohorts of LoRA jobs on one frozen base vs the same jobs trained one by one with PEFT.

    python -P bench/bench_e2e.py --shape 8b [--cohorts 1,4,8,16] [--batches 1x512,4x512,mixed] [--out DIR]
    python -P bench/bench_e2e.py --shape tiny --device cpu        # smoke run of the whole script

A random-init Llama of the given shape (vocab 128256) is built on the device in bf16 and saved with its tokenizer to
local disk, so the Cohort and PEFT load the same weights through `from_pretrained`. Every job of a batch shape has its
own random token sequences (written as JSONL text records of exactly that many tokens in a word-level tokenizer whose
words are the token ids), r=16 LoRA on all 7 projections, AdamW. One run measures, in order:

1. the bf16 matmul peak (8192³) that MFU divides by;
2. `Cohort.step` for cohorts of N jobs (jobs 0..N-1 of the shape), with the first memory setting whose step fits:
   one pass; passes of at most --pass-tokens tokens (no recomputation); every other decoder layer checkpointed;
   every layer checkpointed;
3. the frozen-base forward+backward vs the same with 8 adapters attached (same packed tokens), and a profile of one
   8-adapter step (top CUDA kernels);
4. optionally (--parts) where one whole step's time goes: its kernels by part (frozen GEMMs, LM head, attention,
   LoRA kernels, elementwise, loss, optimizer, host gaps) against each part's ideal (bench/step_parts.py);
5. optionally (--long-context N) one job of one N-token sequence, in the cohort and in every baseline;
   optionally (--evaluate N) one job's validation pass (`Cohort.evaluate`) over N micro-batches of the first batch
   shape, in a cohort of the largest size, read and tokenised the first time, cached the second;
6. optionally the capacity probe: the most 4x512 jobs whose step fits in passes, searched between the smallest
   and the largest size given (bench/capacity_search.py: exact when one more job is seen not to fit);
   for every cohort that ran in one pass or in passes, the scheduler's memory model (`scheduler/policy.py`, before
   calibration) next to the measured peak: what an executor's calibration factor would learn;
7. the baselines (--baselines): each job of the largest cohort trained alone with PEFT (sdpa attention, bf16 base,
   fp32 adapters, AdamW, clip 1.0), one after another, on exactly the tokens it has in the cohort: `peft` as the
   bench always ran it, `tuned` with fused AdamW and bf16 autocast, `liger` tuned plus Liger kernels
   (liger-kernel from PyPI). A cohort of N is compared with the sum of each baseline's step times of its N jobs (the
   time it needs to give all N jobs one step) and the speedup is over the fastest baseline.

Step times are medians over the timed steps after warm-up, synchronised; tokens are all input tokens of a step.
MFU = 4·P·tokens/s ÷ measured peak, with P the parameters outside the embedding and the LM head (frozen base: forward
2P, backward dX only 2P). Results go to OUT/e2e_<shape>.json as they come, the table to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench/'s helper modules (step_parts, capacity_search) under -P

VOCAB = 128256
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, rope_theta=500000.0, vocab_size=VOCAB, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, rope_theta=500000.0, vocab_size=VOCAB, tie_word_embeddings=True),
    # built quantized layer by layer in memory by bench_70b_nf4.py (its bf16 weights would not fit one GPU or disk)
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, rope_theta=500000.0, vocab_size=VOCAB, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
    # the 1B shape's layers (so as many adapter tensors per job: a checkpoint's host-side cost) at tiny widths, for CPUs
    "narrow16": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=16, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}
MIXED_LENGTHS = (128, 1024)  # per-sequence lengths of a "mixed" micro-batch: uniform in this range
EOS_ID = 0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (start.elapsed_time(end) / 1000) / 1e12


def build_base(shape: str, directory: Path, device, max_positions: int = 8192) -> int:
    """Random-init the shape on the device, save weights and a word-level tokenizer; return non-embedding params."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max_positions, bos_token_id=None,
                         eos_token_id=EOS_ID)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    non_embedding = sum(p.numel() for n, p in model.model.layers.named_parameters()) + model.model.norm.weight.numel()
    model.save_pretrained(directory)
    del model
    save_tokenizer(directory, config.vocab_size)
    return non_embedding


def save_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer whose words are the token ids ("t17" is token 17), EOS "</s>" = EOS_ID."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"</s>": EOS_ID, **{f"t{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>").save_pretrained(directory)


def batch_lengths(batch: str, rng: random.Random | None = None) -> list[int]:
    """Sequence lengths of a micro-batch of shape `batch` ("4x512", or "mixed": drawn from `rng`)."""
    if batch == "mixed":
        rng = rng or random.Random(0)
        return [rng.randint(*MIXED_LENGTHS) for _ in range(4)]
    count, length = (int(x) for x in batch.split("x"))
    return [length] * count


def job_sequences(batch: str, job: int, vocab: int, micro_batch: int = 0) -> list[list[int]]:
    """One micro-batch of token sequences (each ending in EOS) for job `job` of batch shape `batch` (its first, or
    its `micro_batch`-th: another draw)."""
    rng = random.Random(f"{batch}/{job}" if micro_batch == 0 else f"{batch}/{job}/{micro_batch}")
    lengths = batch_lengths(batch, rng)
    return [[rng.randrange(1, vocab) for _ in range(n - 1)] + [EOS_ID] for n in lengths]


def write_job_data(directory: Path, batch: str, job: int, vocab: int, micro_batches: int = 1) -> Path:
    """Job `job`'s dataset: `micro_batches` micro-batches of records (one: every step after the first trains on the
    same records, already tokenised; more: steps read and tokenise records of their first epoch, as a new job does)."""
    path = directory / f"{batch}-{job}.jsonl"
    with open(path, "w") as handle:
        for micro_batch in range(micro_batches):
            for sequence in job_sequences(batch, job, vocab, micro_batch):
                handle.write(json.dumps({"text": " ".join(f"t{i}" for i in sequence[:-1])}) + "\n")
    return path


# The adapter every job trains, in the cohort and in the PEFT baseline alike (main sets the dropout from the
# command line).
ADAPTER = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}


def job_spec(model_dir: Path, batch: str, job: int, quantization: str = "none"):
    from lorafleet.scheduler.spec import parse_spec

    return parse_spec(
        {
            "base_model": str(model_dir),
            "dataset": "unused",
            "quantization": quantization,
            "adapter": {**ADAPTER, "target_modules": list(PROJECTIONS)},
            "hyperparameters": {
                "batch_size": 4 if batch == "mixed" else int(batch.split("x")[0]),
                "max_seq_len": max(2048, max(batch_lengths(batch))),
                "max_steps": 100_000,
                "seed": job,
            },
        }
    )


# Memory settings, tried in this order until a step fits: (decoder layers checkpointed: every n-th, passes of at most
# PASS_TOKENS tokens per step?). `passes` keeps every activation of one pass and recomputes nothing.
MEMORY_SETTINGS = {"off": (0, False), "passes": (0, True), "half": (2, False), "full": (1, False)}
PASS_TOKENS = 8192


def set_checkpointing(cohort, setting: str) -> None:
    """What Cohort(activation_checkpointing=n, max_pass_tokens=...) does, on the loaded cohort."""
    from lorafleet.executor.activations import checkpoint_layers

    every, passes = MEMORY_SETTINGS[setting]
    checkpoint_layers(cohort.model.base_model.layers, cohort.routing, every)
    cohort.max_pass_tokens = PASS_TOKENS if passes else None


def release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def add_jobs(cohort, model_dir, data_dir, batch, n) -> None:
    for job in range(n):
        spec = job_spec(model_dir, batch, job, cohort.quantization)
        cohort.add_job(f"{batch}-{job}", spec, data_dir / f"{batch}-{job}.jsonl")


def timed_steps(cohort, warmup: int, steps: int, device) -> float:
    """Median seconds of `steps` synchronised `Cohort.step` calls after `warmup` untimed ones (host time included);
    raises when a job fails."""
    for _ in range(warmup):
        cohort.step()
    seconds = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        results = cohort.step()
        sync(device)
        seconds.append(time.perf_counter() - start)
        failed = [result.error for result in results.values() if result.error]
        if failed:
            raise RuntimeError(failed[0])
    return statistics.median(seconds)


def remove_jobs(cohort, device) -> None:
    """Detach every job (its pending gradients dropped) and give the memory back."""
    for job_id in list(cohort.jobs):
        cohort.jobs[job_id].optimizer.zero_grad()
        cohort.remove_job(job_id)
    release(device)


def run_cohort(cohort, model_dir, data_dir, batch, n, warmup, steps, checkpointing, device):
    """Median step seconds and peak GiB of a cohort of jobs 0..n-1 of `batch`; None when it does not fit."""
    set_checkpointing(cohort, checkpointing)
    release(device)
    try:
        add_jobs(cohort, model_dir, data_dir, batch, n)
        return timed_steps(cohort, warmup, steps, device), peak_gib(device)
    except torch.OutOfMemoryError:
        return None
    finally:
        remove_jobs(cohort, device)


def base_vs_adapters(cohort, device, repeats: int) -> dict:
    """Forward+backward of the same packed tokens through the frozen base alone and with every cohort adapter."""
    from lorafleet.executor.cohort import pack, split_passes
    from lorafleet.executor.loss import token_losses
    from lorafleet.executor.model import packing_kwargs

    model = cohort.model
    examples = {job_id: job.data.next_batch()[0] for job_id, job in cohort.jobs.items()}
    batches = [pack(part, device) for part in split_passes(examples, cohort.max_pass_tokens)]

    def forward_backward(adapters: bool):
        for batch in batches:
            cohort.routing.segments = batch.rows if adapters else {}
            cohort.routing.dropout_seeds = cohort.dropout_seeds(batch) if adapters else None
            try:
                kwargs = packing_kwargs(batch.sequence_lengths, device)
                embeds = model.get_input_embeddings()(batch.input_ids).requires_grad_(not adapters)
                hidden = model.base_model(inputs_embeds=embeds, use_cache=False, **kwargs).last_hidden_state[0]
                token_losses(hidden, model.lm_head.weight, batch.targets).sum().backward()
            finally:
                cohort.routing.segments, cohort.routing.dropout_seeds = {}, None
        for job in cohort.jobs.values():
            job.optimizer.zero_grad()

    result = {}
    for name, adapters in (("base", False), ("adapters", True)):
        forward_backward(adapters)
        seconds = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            forward_backward(adapters)
            sync(device)
            seconds.append(time.perf_counter() - start)
        result[name] = statistics.median(seconds)
    result["overhead"] = result["adapters"] / result["base"] - 1
    result["tokens"] = sum(batch.input_ids.shape[1] for batch in batches)
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            forward_backward(True)
            sync(device)
        events = prof.key_averages()
        result["profile"] = events.table(sort_by="cuda_time_total", row_limit=25)
        result["gpu_busy_s"] = sum(event.self_device_time_total for event in events) / 1e6
    return result


def profile_step(cohort, model_dir, data_dir, batch, n, device, trace: Path | None = None) -> str:
    """Host and GPU time of one whole Cohort.step (after three warm-up steps: a CUDA graph, if used, is captured by
    then), by op: where the step's time goes. trace: where to write its gzipped Chrome trace too."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for setting in MEMORY_SETTINGS:
        set_checkpointing(cohort, setting)
        add_jobs(cohort, model_dir, data_dir, batch, n)
        try:
            for _ in range(3):
                cohort.step()
            sync(device)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                with record_function("cohort.step"):
                    cohort.step()
                sync(device)
            if trace is not None:
                prof.export_chrome_trace(str(trace))
            events = prof.key_averages()
            return (f"memory setting {setting}\n" + events.table(sort_by="cpu_time_total", row_limit=40)
                    + "\n" + events.table(sort_by="self_cpu_time_total", row_limit=30))
        except torch.OutOfMemoryError:
            continue
        finally:
            for job_id in list(cohort.jobs):
                cohort.jobs[job_id].optimizer.zero_grad()
                cohort.remove_job(job_id)
            release(device)
    return "no memory setting fits"


# The baselines, each job trained alone with PEFT (r=16 on all 7 projections, fp32 adapters, AdamW, clip 1.0):
# - peft: as the bench ran it before (sdpa, bf16 base, PyTorch's default multi-tensor AdamW, no autocast);
# - tuned: what a careful user adds: fused AdamW, bf16 autocast (the LoRA products in bf16 on fp32 master weights);
# - liger: tuned, plus Liger kernels on the base (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy: no logits).
# Liger patches transformers' Llama module globally, so it runs last.
BASELINES = ("peft", "tuned", "liger")


def peft_model(model_dir, variant: str, device, quantization: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorafleet.executor.model import quantization_config

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quantization == "none":
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    else:  # QLoRA as PEFT users run it: the same bitsandbytes config as the cohort, no other preparation
        base = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="sdpa", device_map={"": device},
            quantization_config=quantization_config(quantization, dtype),
        )
    base.config.use_cache = False
    if variant == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(model=base)
    config = LoraConfig(**ADAPTER, target_modules=list(PROJECTIONS), task_type="CAUSAL_LM")
    model = get_peft_model(base, config, adapter_name="init")
    model.train()
    return model, config


def padded_batch(sequences: list[list[int]], device):
    """Right-padded ids, attention mask and labels (-100 on padding) of one micro-batch, as PEFT users feed it."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), EOS_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


def time_peft_job(model, config, name, sequences, variant, warmup, steps, device) -> tuple[float, float | None]:
    """Median step seconds and peak GiB of one job trained alone (its own adapter and optimizer)."""
    model.add_adapter(name, config)
    model.set_adapter(name)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=variant != "peft" and device.type == "cuda")
    ids, mask, labels = padded_batch(sequences, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant != "peft" and device.type == "cuda")

    def step():
        with autocast:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    try:
        for _ in range(warmup):
            step()
        seconds = []
        for _ in range(steps):
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds), peak_gib(device)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.set_adapter("init")
        model.delete_adapter(name)
        del optimizer, params
        release(device)


def peft_sequential(model_dir, batches: dict[str, int], vocab, warmup, steps, device, quantization="none",
                    variant="peft", long_batch: str | None = None) -> dict:
    """batch shape -> per-job median step seconds and padded tokens, each job trained alone with PEFT in turn; and
    for `long_batch` (one job), the step without and, if that runs out of memory, with gradient checkpointing."""
    model, config = peft_model(model_dir, variant, device, quantization)
    release(device)
    out = {}
    for batch, jobs in batches.items():
        per_job, padded, peaks = [], [], []
        for job in range(jobs):
            sequences = job_sequences(batch, job, vocab)
            seconds, peak = time_peft_job(model, config, f"{batch}-{job}", sequences, variant, warmup, steps, device)
            per_job.append(seconds)
            peaks.append(peak)
            padded.append(len(sequences) * max(len(s) for s in sequences))
        out[batch] = {"per_job_seconds": per_job, "padded_tokens_per_job": padded, "peak_gib": peaks[0] and max(peaks)}
    if long_batch:
        out["long"] = {"batch": long_batch}
        sequences = job_sequences(long_batch, 0, vocab)
        for checkpointing in (False, True):
            if checkpointing:
                model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
                model.base_model.model.enable_input_require_grads()
            try:
                seconds, peak = time_peft_job(model, config, long_batch, sequences, variant, 1, 2, device)
            except torch.OutOfMemoryError:
                out["long"]["oom" + ("_checkpointed" if checkpointing else "")] = True
                release(device)
                continue
            out["long"].update(seconds=seconds, checkpointing=checkpointing, peak_gib=peak)
            break
    del model
    release(device)
    return out


def planner_gib(shape: str, quantization: str, batch: str, n: int, setting: str) -> float | None:
    """What the scheduler plans for a cohort of jobs 0..n-1 of `batch` under a memory setting, in GiB before
    calibration, each job sized by its longest sequence; None for checkpointing, which the model leaves out."""
    from lorafleet.scheduler.memory import (
        ModelShape, cohort_bytes, estimate_activation_bytes, estimate_base_bytes, estimate_job_bytes,
    )
    from lorafleet.scheduler.policy import RunningJob

    every, passes = MEMORY_SETTINGS[setting]
    if every:
        return None
    model = ModelShape.from_config(SHAPES[shape])
    jobs = []
    for job in range(n):
        lengths = [len(sequence) for sequence in job_sequences(batch, job, model.vocab_size)]
        count, longest = len(lengths), max(lengths)
        jobs.append(RunningJob(
            str(job), "bench", estimate_job_bytes(model, ADAPTER["r"], PROJECTIONS, count, longest, "bfloat16"),
            count * longest, 0.0, estimate_activation_bytes(model, count, longest, "bfloat16"), longest,
        ))
    base = estimate_base_bytes(model.num_params(), quantization, "bfloat16")
    return (base + cohort_bytes(jobs, PASS_TOKENS if passes else None)) / 2**30


def planner_table(rows: list[dict]) -> str:
    lines = ["| jobs | per-job batch | memory | planned GiB (uncalibrated) | measured peak GiB | measured / planned |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['jobs']} | {row['batch']} | {row['checkpointing']} | {row['planned_gib']:.1f} "
                     f"| {row['peak_gib']:.1f} | {row['peak_gib'] / row['planned_gib']:.2f} |")
    return "\n".join(lines)


def mfu_text(report: dict, tokens_per_s: float) -> str:
    peak = report["peak_tflops"]
    return f"{4 * report['non_embedding_params'] * tokens_per_s / (peak * 1e12):.0%}" if peak else "-"


def baseline_seconds(report: dict, batch: str, jobs: int) -> dict[str, float]:
    """Baseline name -> seconds to give jobs 0..jobs-1 of `batch` one step each, one after another."""
    return {name: sum(result[batch]["per_job_seconds"][:jobs]) for name, result in report["baselines"].items()
            if batch in result}


def markdown_table(report: dict) -> str:
    names = list(report["baselines"])
    lines = [
        "| jobs | per-job batch | tokens/step | memory | cohort step s | cohort tok/s | cohort MFU | cohort peak GiB "
        + "".join(f"| {name} seq. step s " for name in names)
        + "| best baseline | its tok/s | its MFU | PEFT padding | speedup over the best |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(names) + "---|---|---|---|---|",
    ]
    for row in report["cohorts"]:
        if row["seconds"] is None:
            lines.append(f"| {row['jobs']} | {row['batch']} | {row['tokens']} | full | OOM |" + " |" * (7 + len(names)))
            continue
        baselines = baseline_seconds(report, row["batch"], row["jobs"])
        best = min(baselines, key=baselines.get)
        padded = next(iter(report["baselines"].values()))[row["batch"]]["padded_tokens_per_job"][: row["jobs"]]
        cohort_rate, best_rate = row["tokens"] / row["seconds"], row["tokens"] / baselines[best]
        lines.append(
            f"| {row['jobs']} | {row['batch']} | {row['tokens']} | {row['checkpointing']} "
            f"| {row['seconds']:.3f} | {cohort_rate:,.0f} | {mfu_text(report, cohort_rate)} | {gib_text(row['peak_gib'])} "
            + "".join(f"| {baselines[name]:.3f} " for name in names)
            + f"| {best} | {best_rate:,.0f} | {mfu_text(report, best_rate)} | {1 - row['tokens'] / sum(padded):.0%} "
            f"| {cohort_rate / best_rate:.2f}x |"
        )
    return "\n".join(lines)


def gib_text(gib: float | None) -> str:
    return "-" if gib is None else f"{gib:.1f}"


def long_context_table(report: dict) -> str:
    row = report["long_context"]
    lines = ["| trainer | memory | step s | tok/s | MFU | peak GiB |", "|---|---|---|---|---|---|"]
    if row["seconds"] is None:
        lines.append("| lorafleet | every setting | OOM | | | |")
    else:
        rate = row["tokens"] / row["seconds"]
        lines.append(f"| lorafleet | {row['checkpointing']} | {row['seconds']:.3f} | {rate:,.0f} "
                     f"| {mfu_text(report, rate)} | {gib_text(row['peak_gib'])} |")
    for name, result in report["baselines"].items():
        long = result.get("long")
        if not long:
            continue
        if "seconds" not in long:
            lines.append(f"| {name} | none, gradient checkpointing | OOM | | | |")
            continue
        rate = row["tokens"] / long["seconds"]
        memory = "gradient checkpointing (none: OOM)" if long["checkpointing"] else "none"
        lines.append(f"| {name} | {memory} | {long['seconds']:.3f} | {rate:,.0f} | {mfu_text(report, rate)} "
                     f"| {gib_text(long['peak_gib'])} |")
    return "\n".join(lines)


def copy_gbps(device) -> float | None:
    """Device-to-device copy rate of 4 GiB, bytes read plus written: the memory-bound parts' ceiling."""
    if device.type != "cuda":
        return None
    source = torch.randn(2**30, device=device)
    target = torch.empty_like(source)
    for _ in range(2):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    return 2 * source.numel() * 4 * 10 / (start.elapsed_time(end) / 1000) / 1e9


def step_parts(cohort, model_dir, data_dir, batch, n, device, shape, report, out: Path, name: str) -> dict:
    """Per-part kernel time of one whole Cohort.step against each part's ideal (bench/step_parts.py), and the
    unprofiled median step it is set against. The gzipped trace goes to OUT."""
    import gzip

    from torch.profiler import ProfilerActivity, profile

    from step_parts import ideal_seconds, kernel_parts, parts_table

    for setting in MEMORY_SETTINGS:
        measured = run_cohort(cohort, model_dir, data_dir, batch, n, 2, 5, setting, device)
        if measured is not None:
            break
    else:
        return {"error": "no memory setting fits"}
    set_checkpointing(cohort, setting)
    add_jobs(cohort, model_dir, data_dir, batch, n)
    trace_path = out / f"trace_{name}_{n}x{batch}.json"
    # The profiled step runs eagerly: a graph replay's kernels carry no launching op, so the LM head's GEMMs and the
    # optimizer's kernels could not be told from the others. The kernels are the same ones; the host's share is the
    # measured (graphed, where graphs serve) median step minus the GPU's busy time.
    graphs = cohort.graphs.enabled
    try:
        cohort.graphs.enabled = False
        for _ in range(2):
            cohort.step()
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            cohort.step()
            sync(device)
        prof.export_chrome_trace(str(trace_path))
        cohort.graphs.enabled = graphs
        timeline = graphed_timeline(cohort, device, out / f"trace_{name}_{n}x{batch}_graphed.json")
    finally:
        cohort.graphs.enabled = graphs
        for job_id in list(cohort.jobs):
            cohort.jobs[job_id].optimizer.zero_grad()
            cohort.remove_job(job_id)
        release(device)
    parts = kernel_parts(str(trace_path))
    with open(trace_path, "rb") as source, gzip.open(f"{trace_path}.gz", "wb") as target:
        target.write(source.read())
    trace_path.unlink()
    lengths = [length for job in range(n) for length in batch_lengths(batch)]
    ideal = ideal_seconds(SHAPES[shape], lengths, n, ADAPTER["r"], report["peak_tflops"] or 1, report["copy_gbps"] or 1)
    return {"jobs": n, "batch": batch, "checkpointing": setting, "wall_s": measured[0], "peak_gib": measured[1],
            **parts, "ideal": ideal, "table": parts_table(parts, ideal, measured[0]), "graphed_timeline": timeline}


def graphed_timeline(cohort, device, trace_path: Path) -> dict:
    """One graphed step profiled with Python stacks: how long the GPU waits on the host, and in which of our
    functions (step_parts.host_timeline), and what ran on the device (step_parts.device_work). The eager profile
    above cannot say: its host time is the eager step's, and its gradients are accumulated otherwise."""
    import gzip

    from torch.profiler import ProfilerActivity, profile

    from step_parts import device_work, host_timeline

    if not cohort.graphs.enabled or device.type != "cuda":
        return {"error": "no CUDA graphs here"}
    for _ in range(3):  # a layout is captured when it repeats
        cohort.step()
    replays = cohort.graphs.replays
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        cohort.step()
        sync(device)
    if cohort.graphs.replays == replays:
        return {"error": "the profiled step ran eagerly"}
    prof.export_chrome_trace(str(trace_path))
    with open(trace_path) as handle:
        trace = json.load(handle)  # read once for both
    timeline = {**host_timeline(trace, str(Path(__file__).resolve().parents[1])), "device": device_work(trace)}
    with open(trace_path, "rb") as source, gzip.open(f"{trace_path}.gz", "wb") as target:
        target.write(source.read())
    trace_path.unlink()
    return {**timeline, **replay_seconds(cohort, device)}


def replay_seconds(cohort, device, steps: int = 5) -> dict:
    """Unprofiled: the median step's wall time and its graph replay's GPU time (CUDA events on either side of the
    replay; the host is ahead of the GPU there). Their difference is the host's share plus the optimizer's kernels,
    which the profiler inflates."""
    replay = torch.cuda.CUDAGraph.replay
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def timed_replay(graph) -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay(graph)
        end.record()
        events.append((start, end))

    walls = []
    torch.cuda.CUDAGraph.replay = timed_replay
    try:
        for _ in range(steps):
            sync(device)
            begin = time.perf_counter()
            cohort.step()
            sync(device)
            walls.append(time.perf_counter() - begin)
    finally:
        torch.cuda.CUDAGraph.replay = replay
    if len(events) != steps:
        return {"replay_error": f"{len(events)} replays in {steps} steps"}
    return {"unprofiled_step_ms": statistics.median(walls) * 1e3,
            "replay_gpu_ms": statistics.median(start.elapsed_time(end) for start, end in events)}


def capacity_probe(cohort, model_dir, data_dir, sizes: list[int], device, tried) -> tuple[list[dict], dict]:
    """The most 4x512 jobs whose one step fits in passes, searched between the smallest and largest of `sizes`
    (bench/capacity_search.py): each size tried (and handed to `tried` as it is, so a run cut short keeps it), and
    the answer."""
    from capacity_search import Probe, next_size, result

    if not sizes:
        return [], {}
    low, high = min(sizes), max(sizes)
    release(device)
    base_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    device_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0.0
    rows, probes = [], []
    while (n := next_size(probes, low, high, base_gib, device_gib)) is not None:
        measured = run_cohort(cohort, model_dir, data_dir, "4x512", n, 0, 1, "passes", device)
        probes.append(Probe(n, measured is not None, measured and measured[1]))
        rows.append({"jobs": n, "checkpointing": "passes", "fits": measured is not None,
                     "seconds": measured and measured[0], "peak_gib": measured and measured[1]})
        tried(rows[-1])
    return rows, result(probes, high)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(set(SHAPES) - {"70b"}), default="1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quantization", choices=("none", "nf4"), default="none")
    parser.add_argument("--cohorts", default="1,4,8,16")
    parser.add_argument("--batches", default="1x512,4x512,mixed")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help=f"PEFT baselines to run, of {','.join(BASELINES)} (liger needs liger-kernel)")
    parser.add_argument("--overhead", default="8x1x512,8x4x512",
                        help="JOBSxBATCH list: base vs adapters steps (\"\" for none)")
    parser.add_argument("--parts", default="", help="JOBSxBATCH: where one whole step's time goes, by part, "
                        "against each part's ideal (bench/step_parts.py)")
    parser.add_argument("--profile-step", default="", help="JOBSxBATCH: profile one whole Cohort.step (host and GPU)")
    parser.add_argument("--long-context", type=int, default=0, help="one job of one sequence this long, in the "
                        "cohort and in every baseline (0: none)")
    parser.add_argument("--capacity", default="", help="4x512 cohort sizes bounding the capacity search in passes "
                        "(its smallest and largest), e.g. 144,320")
    parser.add_argument("--pass-tokens", type=int, default=PASS_TOKENS, help="tokens per pass of the `passes` setting")
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="every job's LoRA dropout, in the cohort (fused into the LoRA kernels) "
                        "and in the PEFT baseline alike")
    parser.add_argument("--cuda-graphs", choices=("on", "off", "both"), default="on",
                        help="the cohort's CUDA-graphed steps (executor/step_graph.py); both: every cohort row and "
                        "--profile-step eagerly first, then graphed (the eager rows go to eager_cohorts)")
    parser.add_argument("--attention", choices=("auto", "varlen"), default="auto",
                        help="the cohort's attention: auto (cuDNN's dense kernel for rows of equal-length sequences, "
                             "the varlen flash kernel otherwise) or varlen for every row (executor/attention.py)")
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="micro-batches of distinct records in each job's dataset: 1 (the default) trains every "
                        "step on the same records, tokenised once; more than the warm-up and timed steps: every step "
                        "reads and tokenises first-epoch records, as a new job does (the baselines train on the first)")
    parser.add_argument("--evaluate", type=int, default=0, help="micro-batches of a validation set that one job of the "
                        "first batch shape evaluates, twice: first read, then cached (0: none)")
    parser.add_argument("--workdir", default="/tmp/lorafleet-e2e")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    if unknown := {name for name in args.baselines.split(",") if name} - set(BASELINES):
        parser.error(f"--baselines: unknown {sorted(unknown)}; expected some of {','.join(BASELINES)}")
    return args


def jobs_and_batch(spec: str) -> tuple[int, str]:
    """'8x4x512' -> (8, '4x512')."""
    jobs, batch = spec.split("x", 1)
    return int(jobs), batch


class Run:
    """One bench run: its parsed settings, where it writes, and the report every section adds to (saved as it
    grows, so a run cut short keeps what it measured)."""

    def __init__(self, args: argparse.Namespace):
        global PASS_TOKENS
        PASS_TOKENS = args.pass_tokens
        ADAPTER["lora_dropout"] = args.lora_dropout
        from lorafleet.executor import attention
        attention.DENSE_WHEN_UNIFORM = args.attention == "auto"

        self.args, self.device = args, torch.device(args.device)
        self.cohorts = [int(n) for n in args.cohorts.split(",")]
        self.batches = args.batches.split(",")
        self.baselines = sorted((name for name in args.baselines.split(",") if name),
                                key=BASELINES.index)  # liger patches transformers for good: last
        self.overheads = [jobs_and_batch(spec) for spec in args.overhead.split(",") if spec]
        self.capacity = [int(n) for n in args.capacity.split(",") if n]
        self.long_batch = f"1x{args.long_context}" if args.long_context else None
        self.graph_modes = {"on": [True], "off": [False], "both": [False, True]}[args.cuda_graphs]
        self.vocab = SHAPES[args.shape]["vocab_size"]
        workdir, self.out = Path(args.workdir), Path(args.out)
        self.model_dir, self.data_dir = workdir / args.shape, workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.name = args.shape if args.quantization == "none" else f"{args.shape}_{args.quantization}"
        self.name += f"_dropout{args.lora_dropout}" if args.lora_dropout else ""
        self.name += "_varlen" if args.attention == "varlen" else ""
        self.started = time.perf_counter()
        self.report = {
            "shape": args.shape, "quantization": args.quantization, "lora_dropout": args.lora_dropout,
            "attention": args.attention,
            "device": torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cohorts": [], "baselines": {},
        }

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f}s] {message}", flush=True)

    def save(self) -> None:
        (self.out / f"e2e_{self.name}.json").write_text(json.dumps(self.report, indent=1))


def prepare(run: Run) -> None:
    """The device's measured peaks, the random-init base on disk, and every job's data the run will use."""
    args, report = run.args, run.report
    report["peak_tflops"] = matmul_peak_tflops(run.device)
    report["copy_gbps"] = copy_gbps(run.device)
    run.log(f"bf16 matmul peak {report['peak_tflops']} TFLOP/s, copy {report['copy_gbps']} GB/s")
    report["non_embedding_params"] = build_base(args.shape, run.model_dir, run.device, max(8192, args.long_context))
    run.log(f"built and saved {args.shape}: {report['non_embedding_params'] / 1e9:.2f}B non-embedding params")
    wanted = {(batch, job) for batch in run.batches for job in range(max(run.cohorts))}
    wanted |= {("4x512", job) for job in range(max(run.capacity, default=0))}
    wanted |= {(batch, job) for jobs, batch in run.overheads for job in range(jobs)}
    if args.parts:
        jobs, batch = jobs_and_batch(args.parts)
        wanted |= {(batch, job) for job in range(jobs)}
    if run.long_batch:
        wanted.add((run.long_batch, 0))
    for batch, job in wanted:
        write_job_data(run.data_dir, batch, job, run.vocab, args.micro_batches)


def fitting_run(run: Run, cohort, batch: str, n: int, warmup: int, steps: int):
    """(seconds, peak GiB, memory setting) of the first memory setting the cohort fits in; (None, None, last)."""
    for checkpointing in MEMORY_SETTINGS:
        measured = run_cohort(cohort, run.model_dir, run.data_dir, batch, n, warmup, steps, checkpointing, run.device)
        if measured is not None:
            return (*measured, checkpointing)
    return None, None, checkpointing


def measure_cohorts(run: Run, cohort) -> None:
    """Step time and peak of every cohort size x batch, in the first memory setting that fits, per graph mode."""
    for batch in run.batches:
        for n in run.cohorts:
            for graphs in run.graph_modes:
                cohort.graphs.enabled = graphs
                seconds, peak, checkpointing = fitting_run(run, cohort, batch, n, run.args.warmup, run.args.steps)
                tokens = sum(len(s) for job in range(n) for s in job_sequences(batch, job, run.vocab))
                eager_row = not graphs and run.args.cuda_graphs != "off"
                rows = run.report.setdefault("eager_cohorts", []) if eager_row else run.report["cohorts"]
                rows.append({"batch": batch, "jobs": n, "tokens": tokens, "seconds": seconds, "peak_gib": peak,
                             "checkpointing": checkpointing, "cuda_graphs": graphs})
                run.log(f"cohort {n} x {batch} (graphs {graphs}): {seconds} s/step, ckpt {checkpointing}, "
                        f"peak {peak} GiB")
                run.save()


def base_vs_adapters_fitting(run: Run, cohort, jobs: int, batch: str) -> tuple[dict | None, str]:
    """base_vs_adapters in the first memory setting that fits: (its result or None, the setting)."""
    for checkpointing in MEMORY_SETTINGS:
        set_checkpointing(cohort, checkpointing)
        add_jobs(cohort, run.model_dir, run.data_dir, batch, jobs)
        try:
            return base_vs_adapters(cohort, run.device, repeats=run.args.steps), checkpointing
        except torch.OutOfMemoryError:
            pass
        finally:
            for job_id in list(cohort.jobs):
                cohort.remove_job(job_id)
            release(run.device)
    return None, checkpointing


def measure_overheads(run: Run, cohort) -> None:
    run.report["overhead"] = []
    for jobs, batch in run.overheads:
        overhead, checkpointing = base_vs_adapters_fitting(run, cohort, jobs, batch)
        if overhead is None:
            continue
        if "profile" in overhead:
            (run.out / f"profile_{run.name}_{jobs}x{batch}.txt").write_text(overhead.pop("profile"))
        run.report["overhead"].append({"jobs": jobs, "batch": batch, "checkpointing": checkpointing, **overhead})
        run.log(f"base vs {jobs} adapters of {batch}: {run.report['overhead'][-1]}")
        run.save()
    set_checkpointing(cohort, "off")


def measure_parts(run: Run, cohort) -> None:
    jobs, batch = jobs_and_batch(run.args.parts)
    run.report["parts"] = step_parts(cohort, run.model_dir, run.data_dir, batch, jobs, run.device, run.args.shape,
                                     run.report, run.out, run.name)
    run.log(f"where the time goes, {run.args.parts}:\n{run.report['parts'].get('table', run.report['parts'])}")
    run.save()
    set_checkpointing(cohort, "off")


def measure_evaluation(run: Run, cohort) -> None:
    """Seconds of one job's `Cohort.evaluate` over a validation set of --evaluate micro-batches, in a cohort of the
    largest --cohorts size of the first batch shape that has stepped (its largest pass bounds how many micro-batches
    one forward joins): the first pass reads and tokenises every record, the second finds them cached. An untimed
    pass over another set first compiles what the forward needs."""
    from lorafleet.executor.data import JobData

    batch, micro_batches, jobs = run.batches[0], run.args.evaluate, max(run.cohorts)
    directory = run.data_dir / "validation"
    directory.mkdir(exist_ok=True)
    warm_up, path = (write_job_data(directory, batch, job, run.vocab, n) for job, n in ((1, 2), (0, micro_batches)))
    add_jobs(cohort, run.model_dir, run.data_dir, batch, jobs)
    timed_steps(cohort, 1, 1, run.device)
    job_id = next(iter(cohort.jobs))
    hp = cohort.jobs[job_id].spec.hyperparameters
    cohort.evaluate(job_id, JobData(warm_up, "auto", cohort.tokenizer, hp.max_seq_len, hp.batch_size, seed=0))
    data = JobData(path, "auto", cohort.tokenizer, hp.max_seq_len, hp.batch_size, seed=0)
    tokens = sum(len(s) for m in range(micro_batches) for s in job_sequences(batch, 0, run.vocab, m))
    rows = {}
    for attempt in ("first", "cached"):
        sync(run.device)
        start = time.perf_counter()
        cohort.evaluate(job_id, data)
        sync(run.device)
        seconds = time.perf_counter() - start
        rows[attempt] = {"seconds": seconds, "per_micro_batch_ms": 1e3 * seconds / micro_batches,
                         "tokens_per_s": tokens / seconds}
    run.report["evaluate"] = {"batch": batch, "micro_batches": micro_batches, "tokens": tokens, "cohort_jobs": jobs,
                              "largest_pass_tokens": cohort.largest_pass_tokens, **rows}
    remove_jobs(cohort, run.device)
    run.log(f"evaluate {micro_batches} x {batch} in a cohort of {jobs}: {rows}")
    run.save()


def measure_capacity(run: Run, cohort) -> None:
    """The capacity search, each probe logged and saved as it ends (at 8B, a probe of 144 jobs takes most of a
    minute)."""
    run.report["capacity"] = []

    def tried(row: dict) -> None:
        run.report["capacity"].append(row)
        run.log(f"capacity probe: {row}")
        run.save()

    _, run.report["capacity_result"] = capacity_probe(cohort, run.model_dir, run.data_dir, run.capacity, run.device,
                                                      tried)
    run.log(f"capacity: {run.report['capacity_result']} from {run.report['capacity']}")
    run.save()


def profile_steps(run: Run, cohort) -> None:
    spec = run.args.profile_step
    jobs, batch = jobs_and_batch(spec)
    for graphs in run.graph_modes:
        cohort.graphs.enabled = graphs
        kind = "graphs" if graphs else "eager"
        trace = run.out / f"trace_step_{run.name}_{spec}_{kind}.json.gz"
        (run.out / f"profile_step_{run.name}_{spec}_{kind}.txt").write_text(
            profile_step(cohort, run.model_dir, run.data_dir, batch, jobs, run.device, trace))
        run.log(f"profiled one step of {spec} ({kind})")
    cohort.graphs.enabled = run.graph_modes[-1]


def measure_long_context(run: Run, cohort) -> None:
    seconds, peak, checkpointing = fitting_run(run, cohort, run.long_batch, 1, 1, 2)
    run.report["long_context"] = {"batch": run.long_batch, "tokens": run.args.long_context, "seconds": seconds,
                                  "peak_gib": peak, "checkpointing": checkpointing}
    run.log(f"long context {run.long_batch}: {run.report['long_context']}")
    run.save()
    set_checkpointing(cohort, "off")


def measure_baselines(run: Run) -> None:
    """Each PEFT baseline on every job of the largest cohort, one after another (after the cohort is gone)."""
    args = run.args
    for baseline in run.baselines:
        try:
            run.report["baselines"][baseline] = peft_sequential(
                run.model_dir, {b: max(run.cohorts) for b in run.batches}, run.vocab, args.warmup, args.steps,
                run.device, args.quantization, baseline, run.long_batch,
            )
        except Exception as exc:  # a baseline that cannot run here (say, liger-kernel missing) is reported, not fatal
            run.report.setdefault("baseline_errors", {})[baseline] = f"{type(exc).__name__}: {exc}"
            release(run.device)
        run.log(f"baseline {baseline} done: {run.report.get('baseline_errors', {}).get(baseline, 'ok')}")
        run.save()


def planner_rows(run: Run) -> list[dict]:
    """Every cohort that ran (rows and capacity probe) with the scheduler's planned GiB beside its measured peak."""
    report = run.report
    measured = [dict(row) for row in report["cohorts"] if row["peak_gib"] is not None]
    measured += [{**row, "batch": "4x512"} for row in report["capacity"] if row["peak_gib"] is not None]
    return [{**row, "planned_gib": planned} for row in measured
            if (planned := planner_gib(run.args.shape, run.args.quantization, row["batch"], row["jobs"],
                                       row["checkpointing"]))]


def summary_tables(report: dict, long_batch: str | None) -> str:
    table = markdown_table(report) if report["baselines"] else ""
    if long_batch:
        table += f"\n\nLong context, one job of {long_batch}:\n\n" + long_context_table(report)
    if "table" in report.get("parts", {}):
        parts = report["parts"]
        table += (f"\n\nWhere the time goes, {parts['jobs']} x {parts['batch']} ({parts['checkpointing']}), one "
                  f"profiled step against the unprofiled median:\n\n" + parts["table"])
        timeline = parts.get("graphed_timeline") or {}
        if "idle_ms" in timeline:
            table += (f"\n\nOne graphed step profiled with Python stacks: {timeline['step_ms']:.1f} ms, the GPU idle "
                      f"{timeline['idle_ms']:.1f} ms ({timeline['before_first_kernel_ms']:.1f} before its first kernel, "
                      f"{timeline['after_last_kernel_ms']:.1f} after its last); our functions while it was idle "
                      f"(ms, a caller's time includes its callees'):\n\n| function | ms |\n|---|---|\n"
                      + "\n".join(f"| {name} | {ms:.2f} |" for name, ms in timeline["functions_ms"].items()))
        if "device" in timeline:
            work = timeline["device"]
            table += (f"\n\nOn the device in that step: {work['device_ops']:,} kernels, copies and fills; of them\n\n"
                      "| group | count | ms |\n|---|---|---|\n"
                      + "\n".join(f"| {name} | {group['count']:,} | {group['ms']:.2f} |"
                                   for name, group in work["groups"].items()))
        if "replay_gpu_ms" in timeline:
            table += (f"\n\nUnprofiled, the median of 5 graphed steps: {timeline['unprofiled_step_ms']:.1f} ms, of which "
                      f"the graph's replay kept the GPU busy {timeline['replay_gpu_ms']:.1f} ms.")
    if report["planner"]:
        table += "\n\nThe scheduler's memory model against the measured peaks:\n\n" + planner_table(report["planner"])
    return table


def main() -> None:
    from lorafleet.executor.cohort import Cohort

    run = Run(parse_args())
    prepare(run)
    cohort = Cohort(run.model_dir, quantization=run.args.quantization, device=run.args.device)
    run.log("cohort loaded")
    measure_cohorts(run, cohort)
    measure_overheads(run, cohort)
    if run.args.parts:
        measure_parts(run, cohort)
    if run.args.profile_step:
        profile_steps(run, cohort)
    if run.long_batch:
        measure_long_context(run, cohort)
    if run.args.evaluate:
        measure_evaluation(run, cohort)
    measure_capacity(run, cohort)
    del cohort
    release(run.device)
    measure_baselines(run)
    run.report["planner"] = planner_rows(run)
    run.save()

    report = run.report
    table = summary_tables(report, run.long_batch)
    (run.out / f"e2e_{run.name}.md").write_text(table + "\n")
    print(f"\n{run.args.shape}, {report['device']}, torch {report['torch']}, peak {report['peak_tflops']} TFLOP/s, "
          f"copy {report['copy_gbps']} GB/s, P_nonembed {report['non_embedding_params'] / 1e9:.2f}B\n")
    print(table)
    print(f"\nbase vs adapters: {report['overhead']}\ncapacity: {report['capacity_result']} from "
          f"{report['capacity']}")
    print("baseline errors:", report.get("baseline_errors"))
    for baseline, result in report["baselines"].items():
        print(f"{baseline} per-job step s:", {batch: result[batch]["per_job_seconds"] for batch in run.batches})


if __name__ == "__main__":
    main()
