"""A 70B-shape (Llama-3-70B sizes, random init) QLoRA nf4 cohort on one GPU: does it fit, and how fast does it train.

    python -P bench/bench_70b_nf4.py [--jobs 8] [--batch 1x512] [--pass-tokens 2048] [--out DIR]
    python -P bench/bench_70b_nf4.py --shape tiny --device cpu        # smoke run

The bf16 weights of a 70B model (140 GB) fit neither one H200 nor the device machine's disk, so the base is built
in memory: every decoder layer is made in bf16 on the device, its seven projections quantized to nf4 (double
quantization, bf16 compute: what `quantization_config("nf4")` loads), and only then the next layer is made. The
Cohort gets this model through its loader (patched here); everything after that is the real `Cohort.step`, as
bench_e2e.py times it: the first memory setting whose step fits (one pass; passes of --pass-tokens; checkpointing),
median step of --steps after --warmup, tokens/s, MFU (4·P·tokens/s over the measured bf16 matmul peak, P = the
decoder's linear weights counted by shape) and the peak. No PEFT baseline: its QLoRA of this shape is a separate run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import bench_e2e  # noqa: E402
from bench_e2e import (  # noqa: E402
    MEMORY_SETTINGS, SHAPES, job_sequences, matmul_peak_tflops, run_cohort, save_tokenizer, write_job_data,
)

PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def nf4_linear(linear: nn.Linear, dtype: torch.dtype, device) -> nn.Module:
    """The bitsandbytes nf4 layer transformers would load for this linear's weight."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
                              quant_type="nf4", compress_statistics=True, device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    return layer.to(device)  # quantizes


def random_nf4_llama(shape: str, dtype: torch.dtype, device):
    """A random-init Llama of `shape`, decoder projections in nf4, built one layer at a time; and its P."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    from lorafleet.executor.model import PACKED_ATTENTION

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, bos_token_id=None,
                         eos_token_id=bench_e2e.EOS_ID)
    config._attn_implementation = PACKED_ATTENTION
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    with torch.device(device):
        model.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        model.model.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(dtype)
        model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
        params = 0
        for index in range(config.num_hidden_layers):
            layer = LlamaDecoderLayer(config, index).to(dtype)
            for block, names in PROJECTIONS.items():
                for name in names:
                    linear = getattr(getattr(layer, block), name)
                    params += linear.weight.numel()
                    setattr(getattr(layer, block), name, nf4_linear(linear, dtype, device))
            model.model.layers[index] = layer
    model.requires_grad_(False)
    model.eval()
    return model, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=("70b", "8b", "tiny"), default="70b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--batch", default="1x512")
    parser.add_argument("--pass-tokens", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/lorafleet-70b")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    bench_e2e.PASS_TOKENS = args.pass_tokens

    from transformers import AutoTokenizer

    from lorafleet.executor import cohort as cohort_module

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    workdir, out = Path(args.workdir), Path(args.out)
    model_dir, data_dir = workdir / args.shape, workdir / "data"
    for directory in (model_dir, data_dir, out):
        directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {"shape": args.shape, "quantization": "nf4", "jobs": args.jobs, "batch": args.batch,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "peak_tflops": matmul_peak_tflops(device)}

    def log(message):
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    vocab = SHAPES[args.shape]["vocab_size"]
    save_tokenizer(model_dir, vocab)
    for job in range(args.jobs):
        write_job_data(data_dir, args.batch, job, vocab)
    model, report["linear_params"] = random_nf4_llama(args.shape, dtype, device)
    report["base_gib"] = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None
    log(f"built {args.shape} nf4: {report['linear_params'] / 1e9:.2f}B linear params, {report['base_gib']} GiB")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    cohort_module.load_base = lambda *_args, **_kwargs: (model, tokenizer)
    cohort = cohort_module.Cohort(model_dir, quantization="nf4", device=args.device)
    log("cohort ready")
    for setting in MEMORY_SETTINGS:
        measured = run_cohort(cohort, model_dir, data_dir, args.batch, args.jobs, args.warmup, args.steps, setting,
                              device)
        log(f"memory setting {setting}: {measured}")
        if measured is not None:
            break
    tokens = sum(len(s) for job in range(args.jobs) for s in job_sequences(args.batch, job, vocab))
    report.update(memory=setting if measured else None, tokens=tokens, seconds=measured and measured[0],
                  peak_gib=measured and measured[1])
    if measured and report["peak_tflops"]:
        rate = tokens / measured[0]
        report.update(tokens_per_s=rate, mfu=4 * report["linear_params"] * rate / (report["peak_tflops"] * 1e12))
    (out / f"e2e_{args.shape}_nf4_{args.jobs}x{args.batch}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
