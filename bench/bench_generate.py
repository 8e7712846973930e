"""Many-adapter generation benchmark: the S-LoRA engine (executor/generate.py) against PEFT switching adapters.

    python -P bench/bench_generate.py --shape 1b [--adapters 1,8,64,512] [--requests 512] [--out DIR]
    python -P bench/bench_generate.py --shape tiny --device cpu --requests 8 --adapters 1,4 --prompt 8 \\
        --new-tokens 4 --peft-sample 2 --train-jobs 2 --train-steps 2      # smoke run of the whole script
    python -P bench/bench_generate.py --shape 1b --peft-sample 0 --train-jobs 0     # the engine's rates alone
    python -P bench/bench_generate.py --shape 1b --peft-sample 0 --train-jobs 0 --max-prefill-tokens 2048
                                      # 16 prompts a round: requests join the running batch over 32 rounds

A random-init Llama of the shape (bench_e2e's shapes and builder, bf16 on the GPU) and N random rank-r LoRA adapters
(PEFT directories as `Cohort.export` writes them, B nonzero) on --targets. One run measures, in order:

1. the engine: `Generator.generate` of --requests requests (random --prompt-token prompts, --new-tokens greedy tokens
   each, no eos) where request i uses adapter i mod A, for each A of --adapters: generated tokens/s, the pool's pages;
2. PEFT: the adapters of --peft-sample requests loaded into one PeftModel, each request run alone (`set_adapter` +
   `generate`), timed and scaled to all requests (the rate of one request at a time does not depend on how many
   adapters there are); the sampled requests' tokens are compared with the engine's (bf16 may differ after a near tie);
3. training beside generation: a Cohort of --train-jobs jobs, its median step time alone, then with one generate
   batch (--train-requests requests over the live jobs' adapters) between steps on the same model (no second copy):
   the steps' own slowdown and the time the batches take.

Times are synchronised wall seconds after a warm-up call. Results go to OUT/generate_<shape>.json and a markdown
table to OUT/generate_<shape>.md and stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import SHAPES, build_base, job_spec, release, sync, write_job_data  # noqa: E402

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
TRAIN_BATCH = "1x512"


def layer_shapes(shape: str, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Module name -> (d_in, d_out) of every targeted projection of the Llama shape."""
    config = SHAPES[shape]
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, inner = hidden // heads, config["intermediate_size"]
    sizes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
             "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
             "gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}
    kind = {name: "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn" for name in sizes}
    return {f"model.layers.{layer}.{kind[name]}.{name}": sizes[name]
            for layer in range(config["num_hidden_layers"]) for name in targets}


def write_adapter(directory: Path, shape: str, targets: tuple[str, ...], rank: int, seed: int,
                  dtype: torch.dtype) -> Path:
    """A PEFT LoRA directory (config + safetensors in `dtype`: bf16 halves 512 adapters' files) with random A and B:
    every adapter changes the tokens."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (d_in, d_out) in layer_shapes(shape, targets).items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, d_in, generator=generator) / d_in**0.5
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(d_out, rank, generator=generator) / rank**0.5
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: tensor.to(dtype) for key, tensor in tensors.items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), task_type="CAUSAL_LM")
    fields = {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
    (directory / "adapter_config.json").write_text(json.dumps(fields, indent=2))
    return directory


def make_requests(count: int, adapters: int, prompt: int, new_tokens: int, vocab: int, key=lambda i: f"a{i}"):
    from lorafleet.executor.generate import GenerationRequest, Sampling

    rng = random.Random(0)
    return [GenerationRequest(f"r{i}", tuple(rng.randrange(1, vocab) for _ in range(prompt)), key(i % adapters),
                              Sampling(max_tokens=new_tokens)) for i in range(count)]


def dtype_name(device) -> str:
    """bf16 on the GPU, fp32 on the CPU (where the smoke run compares tokens with PEFT's exactly)."""
    return "bfloat16" if device.type == "cuda" else "float32"


def timed(device, work):
    sync(device)
    start = time.perf_counter()
    result = work()
    sync(device)
    return time.perf_counter() - start, result


def engine_rows(model_dir, adapter_dirs, args, device, log) -> tuple[list[dict], dict]:
    """Tokens/s of the engine for each adapter count; and the tokens of every request, by adapter count."""
    from lorafleet.executor.generate import MAX_PREFILL_TOKENS, Generator
    from lorafleet.executor.model import load_base
    from lorafleet.executor.multilora import RowRouting

    model, _ = load_base(model_dir, dtype=dtype_name(device), device=str(device))
    generator = Generator(model, RowRouting(), eos_token_ids=(),
                          max_prefill_tokens=args.max_prefill_tokens or MAX_PREFILL_TOKENS)
    for i, directory in enumerate(adapter_dirs):
        generator.load_adapter(f"a{i}", directory)
    vocab = model.config.vocab_size
    warmup = min(8, len(adapter_dirs))
    generator.generate(make_requests(warmup, warmup, args.prompt, 4, vocab))  # kernels compiled
    rows, tokens = [], {}
    for adapters in args.adapters:
        requests = make_requests(args.requests, adapters, args.prompt, args.new_tokens, vocab)
        seconds, completions = timed(device, lambda: generator.generate(requests))
        generated = sum(len(c.token_ids) for c in completions)
        usage = generator.pool_usage()
        rows.append({"adapters": adapters, "requests": len(requests), "seconds": seconds,
                     "generated_tokens": generated, "tokens_per_s": generated / seconds,
                     "pool": {"page_bytes": usage.page_bytes, "total_pages": usage.total_pages,
                              "adapter_pages": usage.adapter_pages, "resident_adapters": usage.resident_adapters,
                              "evictions": generator.pool.evictions}})
        tokens[adapters] = [c.token_ids for c in completions]
        log(f"engine: {adapters} adapters, {len(requests)} requests: {generated / seconds:,.0f} tokens/s")
    generator.close()
    del generator, model
    release(device)
    return rows, tokens


def peft_row(model_dir, adapter_dirs, args, device, engine_tokens, log) -> dict:
    """PEFT one request at a time on a sample of the largest adapter count's requests, scaled to all of them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapters = max(args.adapters)
    sample = make_requests(args.requests, adapters, args.prompt, args.new_tokens,
                           SHAPES[args.shape]["vocab_size"])[:args.peft_sample]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    model = None
    for name in dict.fromkeys(request.adapter for request in sample):
        directory = adapter_dirs[int(name.removeprefix("a"))]
        if model is None:
            model = PeftModel.from_pretrained(base, directory, adapter_name=name)
        else:
            model.load_adapter(directory, adapter_name=name)
    model.eval()
    # the engine runs without eos (every request makes --new-tokens tokens): so does PEFT, rather than banning the eos
    # token with min_new_tokens, which would change which token wins
    base.generation_config.eos_token_id = None

    def run(request):
        model.set_adapter(request.adapter)
        ids = torch.tensor([request.prompt_ids], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=args.new_tokens, pad_token_id=0)
        return tuple(out[0, ids.shape[1]:].tolist())

    run(sample[0])  # warm-up
    seconds, outputs = timed(device, lambda: [run(request) for request in sample])
    want = engine_tokens[adapters][:len(sample)]
    same = sum(got == expected for got, expected in zip(outputs, want))
    generated = sum(len(tokens) for tokens in outputs)
    log(f"peft: {len(sample)} requests one at a time: {generated / seconds:,.0f} tokens/s; "
        f"{same}/{len(sample)} token sequences equal to the engine's")
    del model, base
    release(device)
    return {"adapters": adapters, "sampled_requests": len(sample), "sample_seconds": seconds,
            "tokens_per_s": generated / seconds, "scaled_seconds_for_all": seconds * args.requests / len(sample),
            "same_tokens_as_engine": same,
            "method": "set_adapter + generate per request, sampled requests timed, scaled to all requests"}


def training_row(model_dir, data_dir, args, device, log) -> dict:
    """A cohort's median step time alone, and with a generate batch over its live jobs between steps."""
    from lorafleet.executor.cohort import Cohort
    from lorafleet.executor.generate import Generator

    cohort = Cohort(model_dir, device=str(device))
    for job in range(args.train_jobs):
        cohort.add_job(f"job{job}", job_spec(model_dir, TRAIN_BATCH, job), data_dir / f"{TRAIN_BATCH}-{job}.jsonl")
    generator = Generator(cohort.model, cohort.routing, pool_bytes=args.train_pool_gib << 30)
    requests = make_requests(args.train_requests, args.train_jobs, args.prompt, args.new_tokens,
                             SHAPES[args.shape]["vocab_size"], key=lambda i: f"job{i}")

    def steps(with_generation: bool) -> tuple[float, float | None]:
        step_seconds, generate_seconds = [], []
        for step in range(args.warmup + args.train_steps):
            seconds, _ = timed(device, cohort.step)
            if step >= args.warmup:
                step_seconds.append(seconds)
            if with_generation:
                seconds, _ = timed(device, lambda: generator.generate(requests))
                if step >= args.warmup:
                    generate_seconds.append(seconds)
        return statistics.median(step_seconds), statistics.median(generate_seconds) if generate_seconds else None

    alone, _ = steps(False)
    shared, generation = steps(True)
    log(f"training: step {alone * 1e3:.1f} ms alone, {shared * 1e3:.1f} ms with generation between steps "
        f"({generation * 1e3:.1f} ms a batch of {len(requests)} requests)")
    del generator, cohort
    return {"jobs": args.train_jobs, "batch": TRAIN_BATCH, "step_seconds_alone": alone,
            "step_seconds_with_generation": shared, "step_slowdown": shared / alone - 1,
            "generate_seconds_between_steps": generation, "generate_requests": len(requests),
            "generated_tokens_per_batch": len(requests) * args.new_tokens}


def markdown(report: dict) -> str:
    peft = report.get("peft")  # None with --peft-sample 0
    lines = [f"# Many-adapter generation, {report['shape']} on {report['device']}", "",
             f"{report['requests']} requests, prompt {report['prompt']} tokens, {report['new_tokens']} new tokens "
             f"(greedy), rank-{report['rank']} LoRA on {', '.join(report['targets'])}"
             + (f", at most {report['max_prefill_tokens']} prompt tokens a round." if report.get("max_prefill_tokens")
                else "."), "",
             "| adapters in the batch | engine tokens/s | PEFT tokens/s (one request at a time) | speedup | pool pages "
             "(adapters / total) |", "|---|---|---|---|---|"]
    for row in report["engine"]:
        pool = row["pool"]
        versus_peft = (f"{peft['tokens_per_s']:,.0f} | {row['tokens_per_s'] / peft['tokens_per_s']:.1f}x" if peft
                       else "not run | -")
        lines.append(f"| {row['adapters']} | {row['tokens_per_s']:,.0f} | {versus_peft} | {pool['adapter_pages']} / "
                     f"{pool['total_pages']} |")
    if peft:
        lines += ["", f"PEFT: {peft['method']} ({peft['sampled_requests']} requests timed over {peft['adapters']} "
                  f"adapters; {peft['same_tokens_as_engine']} of them gave the engine's tokens)."]
    train = report.get("training")
    if train:
        lines += ["", f"Training beside generation ({train['jobs']} jobs of {train['batch']}): step "
                  f"{train['step_seconds_alone'] * 1e3:.1f} ms alone, {train['step_seconds_with_generation'] * 1e3:.1f}"
                  f" ms with a generate batch between steps ({train['step_slowdown']:+.1%}); each batch of "
                  f"{train['generate_requests']} requests took {train['generate_seconds_between_steps'] * 1e3:.1f} ms."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(set(SHAPES) - {"70b"}), default="1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--adapters", default="1,8,64,512", help="distinct adapters per batch, a list")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens of each request")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-prefill-tokens", type=int, default=None,
                        help="prompt tokens the engine takes a round (default: the engine's): below the batch's "
                             "prompts, requests join the running batch over several rounds")
    parser.add_argument("--targets", default=",".join(ATTENTION_PROJECTIONS), help="projections the adapters target")
    parser.add_argument("--peft-sample", type=int, default=16, help="requests PEFT runs (one at a time), scaled (0: skip PEFT)")
    parser.add_argument("--train-jobs", type=int, default=8, help="cohort jobs for the training part (0: skip it)")
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--train-requests", type=int, default=64, help="requests of each generate batch between steps")
    parser.add_argument("--train-pool-gib", type=int, default=4, help="the pool of the generator beside training")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/lorafleet-generate")
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    args.adapters = [int(n) for n in args.adapters.split(",")]
    args.targets = tuple(args.targets.split(","))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    workdir, out = Path(args.workdir), Path(args.out)
    model_dir, data_dir = workdir / args.shape, workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    report = {"shape": args.shape, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "requests": args.requests, "prompt": args.prompt, "new_tokens": args.new_tokens, "rank": args.rank,
              "targets": list(args.targets), "max_prefill_tokens": args.max_prefill_tokens}
    build_base(args.shape, model_dir, device)
    file_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    adapter_dirs = [write_adapter(workdir / "adapters" / f"a{i}", args.shape, args.targets, args.rank, i, file_dtype)
                    for i in range(max(args.adapters))]
    log(f"built {args.shape} and {len(adapter_dirs)} adapters")
    report["engine"], engine_tokens = engine_rows(model_dir, adapter_dirs, args, device, log)
    if args.peft_sample:
        report["peft"] = peft_row(model_dir, adapter_dirs, args, device, engine_tokens, log)
    if args.train_jobs:
        for job in range(args.train_jobs):
            write_job_data(data_dir, TRAIN_BATCH, job, SHAPES[args.shape]["vocab_size"])
        report["training"] = training_row(model_dir, data_dir, args, device, log)
    (out / f"generate_{args.shape}.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / f"generate_{args.shape}.md").write_text(table)
    print(table)
    return report


if __name__ == "__main__":
    main()
