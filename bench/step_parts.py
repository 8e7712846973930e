"""Where a cohort step's time goes: the kernels of one profiled step by part, each part against its ideal.

`kernel_parts(trace)` reads a torch.profiler Chrome trace (`prof.export_chrome_trace`) and sums kernel time by part:

| part | kernels |
|---|---|
| frozen GEMMs | cuBLAS/nvjet/CUTLASS matrix products outside the loss (forward and dX of every projection) |
| LM head GEMMs | matrix products under `_ChunkedHeadLoss` (logits and the hidden-state gradient) |
| attention | flash attention and cuDNN's fused attention (`sdpa` kernels and its `cudnn::fusion` helpers: dO·O, the dQ conversion), forward and backward |
| LoRA kernels | the Triton shrink / expand / dA / dH+dB kernels (kernels/triton_lora.py) |
| fused elementwise | the Triton RMSNorm (with the residual add) / SiLU·mul / rotary kernels (kernels/elementwise.py) |
| loss elementwise | any other kernel under the loss (fp32 upcast, logsumexp, exp, scatter, casts) |
| optimizer | fused AdamW, the gradient norms and clipping (`_foreach_*`, under `Optimizer.step`) |
| other | the rest: PyTorch elementwise kernels, copies, fills |

A kernel's part comes from its name, then from the CPU ops that enclosed its launch (the kernel's `External id`
names its launching op; that op's enclosing ops on the same thread are found by time containment). GPU busy is the
union of kernel intervals, so the step's wall time minus it is the host's share ("host gaps").

`host_timeline(trace)` reads the trace of one graphed step (profiled with `with_stack=True`): the stretches where
the GPU is idle (before the first kernel, between kernels, after the last) and the step's own Python functions that
ran while it was, so a graphed step's host gaps are named, not inferred.

`device_work(trace)` counts what ran on the device in a profiled step (kernels, copies, fills) and picks out the
small kernels a graphed step should not hold: autograd's fp32 gradient adds and fills, the LoRA gradient kernels
beside them (kernels/grad_sink.py). `python3 bench/step_parts.py TRACE[.gz]` prints it for a saved trace.

`ideal_seconds(...)` gives each part's floor: FLOPs over the measured matmul peak for the GEMMs and attention, the
fewest bytes over the measured copy bandwidth for the memory-bound parts (each counted in its function's comment).
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PARTS = ("frozen GEMMs", "LM head GEMMs", "attention", "LoRA kernels", "fused elementwise", "loss elementwise",
         "optimizer", "other")
GEMM = re.compile(r"nvjet|gemm|cutlass|xmma|cublas", re.IGNORECASE)
LORA = re.compile(r"_shrink_kernel|_expand_kernel|_weight_grad_kernel|_grad_h_and_b_kernel")
FUSED_ELEMENTWISE = re.compile(r"_rms_norm_|_silu_mul_|_rotary_kernel")
OPTIMIZER_KERNEL = re.compile(r"adam|multi_tensor_apply", re.IGNORECASE)
ATTENTION_KERNEL = re.compile(r"flash|fmha|sdpa|cudnn::fusion", re.IGNORECASE)  # sdpa, fusion: cuDNN's attention
LOSS_OP = "_ChunkedHeadLoss"
OPTIMIZER_OPS = ("Optimizer.step", "_foreach_", "clip_grad", "get_total_norm")
DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


@dataclass
class Op:
    name: str
    tid: object
    start: float
    end: float
    context: str = ""  # "loss", "optimizer" or "" (from this op and the ops enclosing it)


def op_context(names: list[str]) -> str:
    """The part a stack of enclosing CPU op names (outermost first) puts its kernels in, if any."""
    if any(LOSS_OP in name for name in names):
        return "loss"
    if any(marker in name for name in names for marker in OPTIMIZER_OPS):
        return "optimizer"
    return ""


def cpu_ops_by_external_id(events: list[dict]) -> dict[int, Op]:
    """External id -> its CPU op, with the context of its enclosing ops on the same thread."""
    ops = [event for event in events if event.get("ph") == "X" and event.get("cat") in ("cpu_op", "user_annotation")]
    by_thread = defaultdict(list)
    for event in ops:
        by_thread[(event.get("pid"), event.get("tid"))].append(event)
    found = {}
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda event: (event["ts"], -event.get("dur", 0)))
        stack: list[tuple[float, str]] = []  # (end, name) of the ops enclosing the current one
        for event in thread_events:
            start, end = event["ts"], event["ts"] + event.get("dur", 0)
            while stack and stack[-1][0] < end:
                stack.pop()
            stack.append((end, event["name"]))
            external = event.get("args", {}).get("External id")
            if external is not None:
                found[external] = Op(event["name"], event.get("tid"), start, end, op_context([n for _, n in stack]))
    return found


def kernel_part(name: str, context: str) -> str:
    if LORA.search(name):
        return "LoRA kernels"
    if FUSED_ELEMENTWISE.search(name):
        return "fused elementwise"
    if ATTENTION_KERNEL.search(name):
        return "attention"
    if GEMM.search(name):
        return "LM head GEMMs" if context == "loss" else "frozen GEMMs"
    if context == "loss":
        return "loss elementwise"
    if context == "optimizer" or OPTIMIZER_KERNEL.search(name):
        return "optimizer"
    return "other"


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals given in microseconds, in seconds."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total / 1e6


def kernel_parts(trace: dict | str) -> dict:
    """Seconds of kernel time per part, kernel counts per part, GPU busy seconds, and the top kernels of each part."""
    events = _events(trace)
    ops = cpu_ops_by_external_id(events)
    seconds, counts = defaultdict(float), defaultdict(int)
    top = defaultdict(lambda: defaultdict(float))
    intervals = []
    for event in events:
        if event.get("ph") != "X" or event.get("cat") not in DEVICE_CATEGORIES:
            continue
        op = ops.get(event.get("args", {}).get("External id"))
        part = kernel_part(event["name"], op.context if op else "")
        duration = event.get("dur", 0)
        seconds[part] += duration / 1e6
        counts[part] += 1
        top[part][event["name"][:80]] += duration / 1e6
        intervals.append((event["ts"], event["ts"] + duration))
    return {
        "seconds": {part: seconds.get(part, 0.0) for part in PARTS},
        "kernels": {part: counts.get(part, 0) for part in PARTS},
        "gpu_busy_s": busy_seconds(intervals),
        "top": {part: sorted(names.items(), key=lambda item: -item[1])[:4] for part, names in top.items()},
    }


def decoder_shape(config: dict) -> dict:
    """Sizes the ideals need, from a Llama config dict (hidden, intermediate, layers, heads, kv heads, vocab)."""
    d, heads = config["hidden_size"], config["num_attention_heads"]
    d_kv = config["num_key_value_heads"] * (d // heads)
    inter = config["intermediate_size"]
    # (d_in, d_out) of every LoRA node per layer: q/k/v and gate/up share one node each (fused_decoder)
    groups = [(d, d + 2 * d_kv), (d, d), (d, 2 * inter), (inter, d)]
    projections = [(d, d), (d, d_kv), (d, d_kv), (d, d), (d, inter), (d, inter), (inter, d)]
    return {"d": d, "d_kv": d_kv, "inter": inter, "layers": config["num_hidden_layers"], "vocab": config["vocab_size"],
            "groups": groups, "projections": projections,
            "linear_params": config["num_hidden_layers"] * sum(i * o for i, o in projections)}


def ideal_seconds(config: dict, sequence_lengths: list[int], jobs: int, rank: int, peak_tflops: float,
                  copy_gbps: float) -> dict:
    """Each part's floor for one step of packed sequences (forward + backward, frozen base, `jobs` adapters)."""
    shape = decoder_shape(config)
    d, d_kv, inter, layers, vocab = (shape[key] for key in ("d", "d_kv", "inter", "layers", "vocab"))
    tokens = sum(sequence_lengths)
    flops_rate, bytes_rate = peak_tflops * 1e12, copy_gbps * 1e9
    # forward 2·W·T and dX 2·W·T per projection, no weight gradient
    frozen = 4 * shape["linear_params"] * tokens
    # logits 2·T·V·d and the hidden-state gradient 2·T·V·d
    head = 4 * tokens * vocab * d
    # causal: forward QKᵀ and PV over half of each L×L, 2·L²·d; backward recomputes S and forms dP, dV, dQ, dK: 2.5x
    attention = 3.5 * 2 * sum(length**2 for length in sequence_lengths) * d * layers
    # bf16: the shrink and dA read x, the delta's add reads and writes the output, dH+dB read dY, dX is read and
    # written by the input gradient's add: 4·d_in + 3·d_out elements per token and node
    lora = 2 * tokens * layers * sum(4 * d_in + 3 * d_out for d_in, d_out in shape["groups"])
    # two RMSNorms, each with the residual add before it (forward residual, delta→sum, y 4d; backward dsum, dy,
    # sum→dx 4d), SiLU·mul (forward 3I, backward 5I), rotary of q and k (forward and backward each read and write them)
    elementwise = 2 * tokens * layers * (16 * d + 8 * inter + 4 * (d + d_kv))
    # fp32 AdamW: read param, grad, m, v and write param, m, v (28 B); the norm reads the grad, clipping reads and
    # writes it (12 B)
    adapter_params = layers * rank * sum(i + o for i, o in shape["projections"])
    optimizer = jobs * adapter_params * 40
    return {
        "frozen GEMMs": frozen / flops_rate,
        "LM head GEMMs": head / flops_rate,
        "attention": attention / flops_rate,
        "LoRA kernels": lora / bytes_rate,
        "fused elementwise": elementwise / bytes_rate,
        "loss elementwise": 0.0,  # none once fused into the head GEMM (a fused linear cross-entropy)
        "optimizer": optimizer / bytes_rate,
        "other": 0.0,  # layout copies and unfused elementwise: none in an ideal step
        "host gaps": 0.0,
    }


def parts_table(measured: dict, ideal: dict, wall_s: float) -> str:
    """Markdown: each part's measured seconds, share of the step, ideal seconds and the distance to it."""
    rows = dict(measured["seconds"])
    rows["host gaps"] = max(0.0, wall_s - measured["gpu_busy_s"])
    lines = ["| part | kernels | measured ms | share of step | ideal ms | basis of the ideal | over ideal ms |",
             "|---|---|---|---|---|---|---|"]
    basis = {"frozen GEMMs": "FLOPs / peak", "LM head GEMMs": "FLOPs / peak", "attention": "FLOPs / peak",
             "LoRA kernels": "bytes / copy rate", "fused elementwise": "bytes / copy rate",
             "loss elementwise": "0 (fused into the head GEMM)", "optimizer": "bytes / copy rate",
             "other": "0 (avoidable)", "host gaps": "0"}
    for part in (*PARTS, "host gaps"):
        count = measured["kernels"].get(part, "")
        lines.append(f"| {part} | {count} | {rows[part] * 1e3:.1f} | {rows[part] / wall_s:.1%} "
                     f"| {ideal[part] * 1e3:.1f} | {basis[part]} | {(rows[part] - ideal[part]) * 1e3:+.1f} |")
    ideal_total = sum(ideal.values())
    lines.append(f"| **step** | {sum(measured['kernels'].values())} | {wall_s * 1e3:.1f} | 100% | {ideal_total * 1e3:.1f} "
                 f"| sum of the parts | {(wall_s - ideal_total) * 1e3:+.1f} |")
    return "\n".join(lines)


IDLE_GAP_US = 20  # shorter stretches between kernels are launch latency, not host work


def idle_stretches(events: list[dict]) -> tuple[list[tuple[float, float]], float, float]:
    """The stretches (µs) where no kernel, copy or fill runs within the step (its CPU events' span), and the span."""
    cpu = [event for event in events if event.get("ph") == "X" and event.get("cat") in ("cpu_op", "python_function")]
    start, end = min(event["ts"] for event in cpu), max(event["ts"] + event.get("dur", 0) for event in cpu)
    device = sorted((event["ts"], event["ts"] + event.get("dur", 0)) for event in events
                    if event.get("ph") == "X" and event.get("cat") in DEVICE_CATEGORIES)
    stretches, reach = [], start
    for kernel_start, kernel_end in device:
        if kernel_start - reach > IDLE_GAP_US:
            stretches.append((reach, kernel_start))
        reach = max(reach, kernel_end)
    if end - reach > IDLE_GAP_US:
        stretches.append((reach, end))
    return stretches, start, end


def host_timeline(trace: dict | str, own: str, top: int = 12) -> dict:
    """Milliseconds the GPU is idle in the profiled step (before its first kernel, between kernels, after the last),
    and the Python functions of the files under the directory `own` by how long they ran while it was (nested
    functions each count, so a caller's time includes its callees'): where the host keeps the GPU waiting."""
    events = _events(trace)
    stretches, start, end = idle_stretches(events)
    overlap = defaultdict(float)
    for event in events:
        function = _own_function(event["name"], own) if event.get("cat") == "python_function" else None
        if function is None:
            continue
        begin, finish = event["ts"], event["ts"] + event.get("dur", 0)
        idle = sum(max(0.0, min(finish, b) - max(begin, a)) for a, b in stretches)
        if idle > 0:
            overlap[function] += idle / 1e3
    first, last = stretches[0] if stretches else (start, start), stretches[-1] if stretches else (end, end)
    return {
        "step_ms": (end - start) / 1e3,
        "idle_ms": sum(b - a for a, b in stretches) / 1e3,
        "before_first_kernel_ms": (first[1] - first[0]) / 1e3 if first[0] == start else 0.0,
        "after_last_kernel_ms": (last[1] - last[0]) / 1e3 if last[1] == end else 0.0,
        "functions_ms": dict(sorted(overlap.items(), key=lambda item: -item[1])[:top]),
    }


DEVICE_GROUPS = {  # name -> the kernels it counts (by kernel name)
    "fp32 adds": re.compile(r"CUDAFunctor_add<float>"),
    "fp32 fills": re.compile(r"FillFunctor<float>"),
    "memsets": re.compile(r"^Memset"),
    "dA kernel": re.compile(r"_weight_grad_kernel"),
    "dH+dB kernel": re.compile(r"_grad_h_and_b_kernel"),
    "bf16 adds": re.compile(r"CUDAFunctor_add<c10::BFloat16>"),
    "adapter stacks (cat, cast)": re.compile(r"CatArrayBatchedCopy|bfloat16_copy_kernel"),
}


def device_work(trace: dict | str) -> dict:
    """How many kernels, copies and fills ran on the device in the trace, and each `DEVICE_GROUPS` group's count
    and milliseconds."""
    events = _events(trace)
    device = [event for event in events if event.get("ph") == "X" and event.get("cat") in DEVICE_CATEGORIES]
    groups = {name: [0, 0.0] for name in DEVICE_GROUPS}
    for event in device:
        for name, pattern in DEVICE_GROUPS.items():
            if pattern.search(event.get("name", "")):
                groups[name][0] += 1
                groups[name][1] += event.get("dur", 0) / 1e3
    return {"device_ops": len(device), "groups": {name: {"count": count, "ms": ms} for name, (count, ms) in
                                                  groups.items()}}


def _events(trace: dict | str) -> list[dict]:
    """A Chrome trace's events, from the trace or its file (gzipped or not)."""
    if isinstance(trace, str):
        opener = gzip.open if trace.endswith(".gz") else open
        with opener(trace, "rt") as handle:
            trace = json.load(handle)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def _own_function(name: str, own: str) -> str | None:
    """`<own>/executor/cohort.py(432): _next_batches` -> `executor/cohort.py: _next_batches`, or None for a function
    of somebody else's file. The profiler names a file relative to the sys.path entry it came from, so with the
    repository itself on PYTHONPATH ours are relative too (`executor/cohort.py(432)`), as torch's are
    (`torch/cuda/graphs.py(80)`): a relative one is ours when `own` holds it."""
    located, _, function = name.partition(": ")
    path, root = re.sub(r"[(]\d+[)]$", "", located), own.rstrip("/") + "/"
    if path.startswith(root):
        return f"{path.removeprefix(root)}: {function}"
    if not Path(path).is_absolute() and (Path(own) / path).is_file():
        return f"{path}: {function}"
    return None


if __name__ == "__main__":
    for path in sys.argv[1:]:
        work = device_work(path)
        print(f"{path}: {work['device_ops']:,} kernels, copies and fills")
        for name, group in work["groups"].items():
            print(f"  {name}: {group['count']:,} ({group['ms']:.2f} ms)")
