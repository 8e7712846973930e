"""The memory model: bytes a base and a cohort take on a device, from the model's shape and each job's spec.

    executor = base weights + generation pool + sum over its cohort of (adapter/optimizer state + activations of one
               micro-batch)

Each term is estimated here, then multiplied by a per-compatibility-key calibration factor that the scheduler learns
from the raw peaks executors measure (`calibrate`). An executor that runs its steps in passes holds the activations of
one pass, not of every job at once (`cohort_bytes`).

"Tokens" everywhere in lorafleet means positions of a micro-batch: every token of a packed sequence, prompt and
target, padding excluded (`formats.tokenise_record` makes them; the cohort trains on them; usage and tokens/s
count them); a LoPA job's m soft-prompt rows before each sequence are positions the base runs on too, so they count
in what a step and a pass hold (`plan_lopa_job`'s tokens_per_step and max_seq_len, the cohort's passes and step
tokens), while its run's `JobPlan.tokens` (fair-share accounting) are its data's. Target tokens, the ones the loss is taken on, are always
called target tokens (never a prompt row).

The planner (`policy`), the scheduler, the executor, submission
and the simulator all size jobs with this module and no other, and with one rule for the compute dtype
(`effective_dtype`). Pure: no Redis, no torch, no files.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Sequence

from lorafleet.scheduler.base_modules import name_matches
from lorafleet.scheduler.spec import ALL_LINEAR, GENERATION_FAMILIES, PREFERENCE_METHODS

COMPUTE_DTYPES = ("bfloat16", "float32")


def auto_dtype(device_type: str, native_bf16: bool) -> str:
    """What a job's `dtype: auto` computes in on a device: bf16 on a GPU that computes it natively (Ampere on), else
    fp32 (a CPU runs bf16 only when asked: natively, but slowly)."""
    return "bfloat16" if device_type == "cuda" and native_bf16 else "float32"


def effective_dtype(job_dtype: str, device_auto_dtype: str) -> str:
    """The dtype a job of `job_dtype` (JobSpec.dtype) computes in on a device whose `auto_dtype` is given."""
    if job_dtype == "auto":
        return device_auto_dtype
    if job_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unknown dtype {job_dtype!r}; expected 'auto' or one of {COMPUTE_DTYPES}")
    return job_dtype


def possible_dtypes(job_dtype: str) -> tuple[str, ...]:
    """Every dtype the job may compute in, over all devices: what it is sized for at submission."""
    return COMPUTE_DTYPES if job_dtype == "auto" else (effective_dtype(job_dtype, "float32"),)


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}  # effective compute dtypes (see `effective_dtype`)
# Storage per parameter of the frozen base. nf4: 4-bit codes + one fp32 absmax per 64-value block (bitsandbytes
# default); int8: 1 byte + one fp32 scale per row, negligible for real widths.
_QUANT_BYTES_PER_PARAM = {"nf4": 0.5 + 4 / 64, "int8": 1.0}
# Trainable adapter parameter: fp32 weight + fp32 grad + Adam's two fp32 moments.
_ADAPTER_STATE_BYTES_PER_PARAM = 16
# DoRA (AdapterSpec.use_dora) keeps, per token of its job and output feature of each layer it targets, two more
# activations for the backward: the base output and the LoRA output that its magnitudes scale (executor/dora.py).
_DORA_ACTIVATIONS_PER_TOKEN_PER_OUT_FEATURE = 2


@dataclass(frozen=True)
class LayerActivations:
    """What one decoder layer keeps for the backward per token, in elements of the compute dtype

        hidden x h + 2 (q + kv) + mlp x intermediate + qk_norm x (q + kv)

    and in fp32 elements, whatever the compute dtype: fp32_hidden x h + fp32_qk_norm x (q + kv).

    hidden: the two norms' inputs and the two normed tensors the projections read (Llama's fused RMSNorm keeps its
    input in the compute dtype; Gemma's norms keep an fp32 copy: fp32_hidden). 2 (q + kv): attention's rotated q and
    k, v, and its output, which o_proj reads (GPT-2 copies it once more: merged heads). mlp: gate and up (the fused
    SiLU·mul keeps no product) and down's input; Hugging Face's unfused MLPs keep more (Phi-3 its gate_up, activation
    and product; Gemma its GELU's input, output and product; GPT-2's tanh GELU four tensors of its input's width).
    qk_norm: Qwen3's q and k norms keep their inputs (Gemma-3's in fp32). Counted from the tensors autograd saves
    (tests/test_memory_families_cpu.py) and checked against H200 peaks (bench/bench_memory_families.py).
    """

    hidden: int = 4
    mlp: int = 3
    qk_norm: int = 0
    fp32_hidden: int = 0
    fp32_qk_norm: int = 0


# By config model_type; a family not named here is taken for Llama's layer (the fused decoder,
# executor/fused_decoder.py: Llama, Mistral, Qwen2, Qwen2-MoE's shared expert).
_LAYER_ACTIVATIONS = {
    "phi3": LayerActivations(mlp=4),
    "qwen3": LayerActivations(qk_norm=1),
    "gemma2": LayerActivations(hidden=2, fp32_hidden=4, mlp=4),
    "gemma3_text": LayerActivations(hidden=2, fp32_hidden=4, mlp=4, fp32_qk_norm=1),
    "gpt2": LayerActivations(hidden=5, mlp=5),
}


# Families whose MLP is up and down without a gate (two matrices, not three).
_UNGATED_MLP_FAMILIES = frozenset({"gpt2", "gpt_bigcode", "gpt_neox", "gptj", "opt", "phi", "falcon", "starcoder2"})


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a decoder-only base model that its memory footprint depends on.

    `modules` are the base's linear layers by name (what `target_modules` names), each with the summed
    in + out features of all its instances: an adapter of rank r on it has r x that many parameters. Submission reads
    them from the base's weights (`scheduler/base_modules.py`); left empty, they are Llama's seven projections.
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads (Gemma and Qwen3 set their own)
    num_experts: int = 0  # routed experts of each MoE layer; 0 for a dense MLP
    expert_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert
    mlp_matrices: int = 3  # gate, up, down; 2 for an ungated MLP (GPT-2)
    tied_embeddings: bool = False  # the LM head is the token embedding
    learned_positions: int = 0  # rows of a learned position embedding (GPT-2's wpe)
    family: str = ""  # the config's model_type: what the layer keeps for the backward (`LayerActivations`)
    experts_per_token: int = 0  # routed experts each token runs through (num_experts_per_tok)
    attention_softcap: bool = False  # Gemma-2's capped attention scores: no flash attention, its scores are kept
    modules: tuple[tuple[str, int], ...] = ()
    # A MoE base's fused expert parameters by key (`model.layers.0.mlp.experts.gate_up_proj`, what
    # `target_parameters` names), each with experts x (in + out) features: a LoRA of rank r on it has r x that many.
    expert_parameters: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_attention_heads", "num_kv_heads",
                     "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ModelShape.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.head_dim and self.hidden_size % self.num_attention_heads:
            raise ValueError("ModelShape.hidden_size must be a multiple of num_attention_heads")

    @classmethod
    def from_config(cls, config: Mapping) -> "ModelShape":
        """From a Hugging Face `config.json` dict of any decoder family: Llama's names, GPT-2's (`n_embd`,
        `n_layer`, `n_head`, `n_inner`), a multimodal wrapper's `text_config`, MoE expert counts."""
        config = config.get("text_config") or config  # a multimodal wrapper's decoder (its model_type: gemma3_text)
        try:
            hidden = _first(config, "hidden_size", "n_embd")
            heads = _first(config, "num_attention_heads", "n_head")
            experts = config.get("num_local_experts") or config.get("num_experts") or 0
            intermediate = config.get("intermediate_size") or config.get("n_inner") or 4 * hidden
            return cls(
                hidden_size=hidden,
                intermediate_size=intermediate,
                num_layers=_first(config, "num_hidden_layers", "n_layer"),
                num_attention_heads=heads,
                num_kv_heads=config.get("num_key_value_heads") or heads,
                vocab_size=config["vocab_size"],
                head_dim=_own_head_dim(config.get("head_dim"), hidden, heads),
                num_experts=experts,
                expert_intermediate_size=(config.get("moe_intermediate_size") or intermediate) if experts else 0,
                shared_expert_intermediate_size=config.get("shared_expert_intermediate_size") or 0,
                mlp_matrices=2 if config.get("model_type") in _UNGATED_MLP_FAMILIES else 3,
                tied_embeddings=config.get("tie_word_embeddings", False),  # unset: counted untied, the larger
                learned_positions=config.get("n_positions") or 0,
                family=config.get("model_type") or "",
                experts_per_token=(config.get("num_experts_per_tok") or 0) if experts else 0,
                attention_softcap=bool(config.get("attn_logit_softcapping")),
            )
        except KeyError as exc:
            raise ValueError(f"model config lacks {exc.args[0]!r}") from None

    @property
    def attention_width(self) -> int:
        """Features of all query heads together (q_proj's output)."""
        return (self.head_dim or self.hidden_size // self.num_attention_heads) * self.num_attention_heads

    @property
    def kv_width(self) -> int:
        """Features of all key (or value) heads together (k_proj's output)."""
        return self.attention_width // self.num_attention_heads * self.num_kv_heads

    def projection_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each of Llama's projections, the default `target_modules`."""
        h, q = self.hidden_size, self.attention_width
        kv = q // self.num_attention_heads * self.num_kv_heads
        i = self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def module_widths(self) -> dict[str, int]:
        """Linear layer name -> in + out features summed over every layer of that name in the model."""
        if self.modules:
            return dict(self.modules)
        return {name: (d_in + d_out) * self.num_layers for name, (d_in, d_out) in self.projection_dims().items()}

    def expert_parameter_widths(self, targets: Sequence[str]) -> int:
        """Experts x (in + out) features summed over the expert parameters `targets` name (PEFT's matching);
        ValueError for a target that names none."""
        total = 0
        for target in targets:
            widths = [width for key, width in self.expert_parameters if name_matches(key, target)]
            if not widths:
                raise ValueError(f"cannot size target parameter {target!r}; the memory model knows "
                                 f"{[key for key, _ in self.expert_parameters] or 'no expert parameters'}")
            total += sum(widths)
        return total

    def num_params(self) -> int:
        """Weights of the base from its config (biases and norms inside a layer are left out: under 2%)."""
        h, q = self.hidden_size, self.attention_width
        kv = q // self.num_attention_heads * self.num_kv_heads
        attention = 2 * h * q + 2 * h * kv
        if self.num_experts:
            mlp = (self.num_experts * (3 * h * self.expert_intermediate_size + h)
                   + 3 * h * self.shared_expert_intermediate_size)
        else:
            mlp = self.mlp_matrices * h * self.intermediate_size
        embeddings = (1 if self.tied_embeddings else 2) * self.vocab_size * h + self.learned_positions * h
        return self.num_layers * (attention + mlp + 2 * h) + embeddings + h


def _own_head_dim(head_dim, hidden: int, heads: int) -> int:
    """A config's head_dim when it is not hidden / heads (Gemma's, Qwen3's), else 0: equal models, equal shapes."""
    return 0 if not head_dim or head_dim * heads == hidden else head_dim


def _first(config: Mapping, *names: str):
    """The value of the first of `names` the config has (families name the same size differently)."""
    for name in names:
        if config.get(name) is not None:
            return config[name]
    raise KeyError(names[0])


def estimate_base_bytes(params: int, quantization: str, dtype: str) -> int:
    """Bytes of the frozen base weights on the device, in an effective compute dtype (`effective_dtype`)."""
    if not isinstance(params, int) or params < 1:
        raise ValueError(f"params must be a positive integer, got {params!r}")
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
    if quantization == "none":
        return params * _DTYPE_BYTES[dtype]
    if quantization not in _QUANT_BYTES_PER_PARAM:
        raise ValueError(f"unknown quantization {quantization!r}; expected 'none', 'nf4' or 'int8'")
    return math.ceil(params * _QUANT_BYTES_PER_PARAM[quantization])


# The generation pool (executor/generate.py's UnifiedPool: KV cache pages and resident adapters) that an executor
# serving its base allocates once, beside the cohort, and keeps while the base is loaded: the KV of an idle serving
# batch (executor/serving.py's IDLE budget: half these tokens generated, as many prompt tokens), and a quarter more
# for the adapters resident in it. Every executor on a base the engine runs serves it (a GaLore job's does not).
GENERATION_POOL_TOKENS = 2 * 16384


def generation_pool_bytes(shape: ModelShape, dtype: str) -> int:
    """Bytes of the generation pool beside a base of `shape` computing in `dtype` (its KV is kept in the compute
    dtype, a quantized base's too): K and V of every layer for GENERATION_POOL_TOKENS tokens, and a quarter more. 0
    for a base the engine does not run (`spec.GENERATION_FAMILIES`): it makes no pool. The executor sizes its pool
    with this function (`serving.pool_bytes`) and the planner reserves the same bytes (`JobSize.pool_bytes`)."""
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
    if shape.family not in GENERATION_FAMILIES:
        return 0
    kv_per_token = 2 * shape.num_layers * shape.kv_width * _DTYPE_BYTES[dtype]
    return kv_per_token * GENERATION_POOL_TOKENS * 5 // 4


def estimate_job_bytes(
    shape: ModelShape,
    r: int,
    target_modules: Sequence[str],
    batch_size: int,
    max_seq_len: int,
    dtype: str,
    dora: bool = False,
    target_parameters: Sequence[str] = (),
) -> int:
    """Bytes one job adds to a cohort: adapter weights, grads and Adam state, plus activations of one micro-batch.

    `target_parameters`: a MoE base's expert parameters the adapter also trains, r x (in + out) per expert each.

    `dora`: also DoRA's magnitudes (one parameter per output feature) and its activations. A module's output features
    are taken as half its in + out width: exact for square projections, 5% under for Llama's seven together.
    (The d_out x d_in weight norm each DoRA layer forms is freed before the next one: not counted.)
    """
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
    for name, value in (("r", r), ("batch_size", batch_size), ("max_seq_len", max_seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    widths = shape.module_widths()
    adapter_params, out_features = 0, 0
    for module in _sized_targets(target_modules, widths, "target module"):
        adapter_params += r * widths[module]
        out_features += widths[module] // 2
    # Two targets naming one parameter (PEFT adapts it once) are not expected: submission names each once.
    adapter_params += r * shape.expert_parameter_widths(target_parameters)
    dora_bytes = 0
    if dora:
        dora_bytes = out_features * (_ADAPTER_STATE_BYTES_PER_PARAM + _DORA_ACTIVATIONS_PER_TOKEN_PER_OUT_FEATURE
                                     * batch_size * max_seq_len * _DTYPE_BYTES[dtype])
    return (adapter_params * _ADAPTER_STATE_BYTES_PER_PARAM + dora_bytes
            + estimate_activation_bytes(shape, batch_size, max_seq_len, dtype))


def estimate_activation_bytes(shape: ModelShape, batch_size: int, max_seq_len: int, dtype: str) -> int:
    """The activations part of `estimate_job_bytes`: what one micro-batch of batch_size sequences (pairs count two:
    `micro_batch_sequences`) keeps for the backward, per token: every layer's (`layer_activation_bytes`), and the
    head's: the final hidden state and the loss's gradient w.r.t. it. The chunked head loss (executor/loss.py) forms
    logits a chunk at a time and keeps none (a chunk of at most 2**28 logits, freed at once: not counted)."""
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
    per_token = (shape.num_layers * layer_activation_bytes(shape, dtype, max_seq_len)
                 + 2 * shape.hidden_size * _DTYPE_BYTES[dtype] + 4)  # + the token's fp32 loss
    return batch_size * max_seq_len * per_token


def layer_activation_bytes(shape: ModelShape, dtype: str, max_seq_len: int) -> int:
    """Bytes one decoder layer keeps for the backward per token of sequences of max_seq_len (`LayerActivations`,
    `capped_scores_bytes`). A MoE layer keeps, besides its shared expert's, the gate, up and down inputs of every
    routed expert a token runs through, its input copied once per routed expert (grouped by expert), and its router's
    logits."""
    kept = _LAYER_ACTIVATIONS.get(shape.family, LayerActivations())
    h, q, kv = shape.hidden_size, shape.attention_width, shape.kv_width
    if shape.num_experts:
        mlp = (kept.mlp * (shape.experts_per_token * shape.expert_intermediate_size
                           + shape.shared_expert_intermediate_size)
               + shape.experts_per_token * h + shape.num_experts)
    else:
        mlp = kept.mlp * shape.intermediate_size
    compute = kept.hidden * h + 2 * (q + kv) + mlp + kept.qk_norm * (q + kv)
    fp32 = kept.fp32_hidden * h + kept.fp32_qk_norm * (q + kv)
    return compute * _DTYPE_BYTES[dtype] + fp32 * 4 + capped_scores_bytes(shape, max_seq_len, dtype)


def capped_scores_bytes(shape: ModelShape, max_seq_len: int, dtype: str) -> int:
    """Per token, what attention with capped scores (Gemma-2; executor/model.py `_softcapped_attention`, no flash
    attention) keeps besides flash's: each head's scores over its sequence (max_seq_len of them) as tanh's output and
    as fp32 softmax, and that softmax in the compute dtype for the product with v (in fp32 the same tensor); k and v
    repeated to every query head (grouped-query attention)."""
    if not shape.attention_softcap:
        return 0
    element = _DTYPE_BYTES[dtype]
    per_score = element + 4 + (element if element != 4 else 0)
    return (shape.num_attention_heads * max_seq_len * per_score
            + 2 * (shape.attention_width - shape.kv_width) * element)


GALORE_PROJECTION_TYPES = ("std", "reverse_std", "left", "right", "full")


def galore_projection_side(rows: int, cols: int, proj_type: str) -> str:
    """Which side of a [rows, cols] gradient GaLore projects (galore-torch's rule): "left" (P = the top-r left
    singular vectors, [rows, r]: the projected gradient is Pᵀ G, [r, cols]), "right" (P = the top-r right singular
    vectors, [r, cols]: G Pᵀ, [rows, r]) or "both" ("full": Pₗᵀ G Pᵣᵀ, [r, r]). "std" keeps the projection matrix
    the smaller one (right when rows >= cols, else left); "reverse_std" the other one."""
    if proj_type == "std":
        return "right" if rows >= cols else "left"
    if proj_type == "reverse_std":
        return "left" if rows >= cols else "right"
    if proj_type in ("left", "right"):
        return proj_type
    if proj_type == "full":
        return "both"
    raise ValueError(f"unknown GaLore proj_type {proj_type!r}; expected one of {GALORE_PROJECTION_TYPES}")


def galore_state_elements(rows: int, cols: int, rank: int, proj_type: str) -> tuple[int, int]:
    """(elements of one Adam moment, elements of the projection matrices) GaLore keeps for a [rows, cols] weight:
    the moments are the projected gradient's shape (`galore_projection_side`). A rank above a side is that side
    (the SVD has no more vectors)."""
    side = galore_projection_side(rows, cols, proj_type)
    r = min(rank, rows, cols)
    if side == "left":
        return r * cols, rows * r
    if side == "right":
        return rows * r, r * cols
    return r * r, rows * r + r * cols


# Bytes per element of every optimizer state the executor keeps: Adam's moments and GaLore's projections are fp32.
_OPTIMIZER_STATE_BYTES = 4
# Full-size fp32 temporaries the GaLore optimizer forms while it steps one parameter (executor/galore.py): the
# gradient's fp32 copy, the bias-corrected moments' quotient and the update (at a refresh, the SVD's factors), of the
# largest parameter at most, since it steps them one at a time. Not yet measured on a GPU.
_GALORE_STEP_TEMPORARIES = 4


def _sized_targets(target_modules: Sequence[str], known: Mapping, what: str) -> list[str]:
    """The module names `target_modules` means (PEFT's `all-linear`: every one the model knows); raises ValueError for
    one the memory model cannot size."""
    if tuple(target_modules) == (ALL_LINEAR,):
        return list(known)
    for module in target_modules:
        if module not in known:
            raise ValueError(f"cannot size {what} {module!r}; the memory model knows {sorted(known)}")
    return list(target_modules)


def galore_optimizer_bytes(shape: ModelShape, rank: int, proj_type: str, target_modules: Sequence[str]) -> int:
    """The optimizer state of a GaLore job on `shape`: for each weight of the target modules (in every layer), fp32
    moments of its projected gradient and its projections (`galore_state_elements`); AdamW's two fp32 moments for
    every other parameter (embeddings, head, norms), as GaLore trains them."""
    _check_galore_shape(shape)
    dims = shape.projection_dims()
    projected_params, elements = 0, 0
    for module in _sized_targets(target_modules, dims, "GaLore target module"):
        d_in, d_out = dims[module]
        moment, projection = galore_state_elements(d_out, d_in, rank, proj_type)  # a Linear's weight: [out, in]
        elements += shape.num_layers * (2 * moment + projection)
        projected_params += shape.num_layers * d_in * d_out
    elements += 2 * (shape.num_params() - projected_params)
    return elements * _OPTIMIZER_STATE_BYTES


def size_galore_job(shape: ModelShape, rank: int, proj_type: str, target_modules: Sequence[str], batch_size: int,
                    max_seq_len: int, dtype: str) -> JobSize:
    """A GaLore job's bytes: it trains every weight of its own copy of the base, so its `base_bytes` are the weights
    in the compute dtype (never quantized, never shared: a one-job cohort), and its `job_bytes` their gradients in the
    compute dtype, the optimizer state (`galore_optimizer_bytes`), the step's temporaries and one micro-batch's
    activations (the base's: a Linear keeps its input for its weight's gradient as for a LoRA's)."""
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
    params = shape.num_params()
    matrices = [d_in * d_out for d_in, d_out in shape.projection_dims().values()]
    largest = max(shape.vocab_size * shape.hidden_size, *matrices)
    activations = estimate_activation_bytes(shape, batch_size, max_seq_len, dtype)
    job_bytes = (params * _DTYPE_BYTES[dtype] + galore_optimizer_bytes(shape, rank, proj_type, target_modules)
                 + _GALORE_STEP_TEMPORARIES * largest * 4 + activations)
    return JobSize(job_bytes, activations, estimate_base_bytes(params, "none", dtype))


def _check_galore_shape(shape: ModelShape) -> None:
    """GaLore jobs are sized from Llama's seven projections (`ModelShape.projection_dims`): dense gated bases only."""
    if shape.num_experts or shape.mlp_matrices != 3:
        raise ValueError(f"GaLore jobs are sized for dense bases with gate, up and down projections; "
                         f"{shape.family or 'this base'} has {'experts' if shape.num_experts else 'an ungated MLP'}")


def lopa_parameter_count(num_virtual_tokens: int, hidden_size: int, encoder_size: int, head_size: int,
                         rank: int) -> int:
    """A LoPA generator's parameters (executor/lopa.py): Z_S (m d), the u head (d_e h + h + h m r + m r), the v head
    (d_e h + h + h d r + d r)."""
    m, d, d_e, h, r = num_virtual_tokens, hidden_size, encoder_size, head_size, rank
    return m * d + 2 * (d_e * h + h) + h * (m + d) * r + (m + d) * r


# What LoPA's generator keeps per sequence for its backward, in fp32 [m, d] tensors: u vᵀ, its sigmoid and the prompt.
_LOPA_GENERATOR_ACTIVATIONS = 3


def size_lopa_job(shape: ModelShape, num_virtual_tokens: int, rank: int, head_size: int, batch_size: int,
                  max_seq_len: int, quantization: str, dtype: str) -> JobSize:
    """A LoPA job's bytes: its generator's parameters with their grads and AdamW state (fp32, as an adapter's), and
    one micro-batch's activations, each sequence m rows longer (its prompt goes through every layer of the base)
    plus the generator's own. Its base is shared with the cohort's other jobs, quantized or not."""
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
    m, d = num_virtual_tokens, shape.hidden_size
    params = lopa_parameter_count(m, d, d, head_size, rank)
    activations = (estimate_activation_bytes(shape, batch_size, max_seq_len + m, dtype)
                   + batch_size * _LOPA_GENERATOR_ACTIVATIONS * m * d * 4)
    return JobSize(params * _ADAPTER_STATE_BYTES_PER_PARAM + activations, activations,
                   estimate_base_bytes(shape.num_params(), quantization, dtype), generation_pool_bytes(shape, dtype))


# A full fine-tune's training FLOPs over an adapter's on the same base: its backward computes every weight's gradient
# as well as the activations' (6 x params x tokens against 4 x params x tokens); GaLore's projection refreshes and the
# optimizer step over every weight are left out (small next to the matmuls at every few hundred steps).
FULL_FINE_TUNE_FLOPS = 1.5


def estimate_gpu_seconds(tokens: int, params: int, tokens_per_second_at_8b: float = 10_000.0) -> float:
    """GPU time a job of `tokens` needs, for fair-share accounting: training FLOPs grow with parameters x tokens.

    The default rate is an 8B base in a full cohort on one H100 (the developers' guide: 6.9k tok/s for one 4x512 job,
    13.8k tok/s ceiling for the bare base); pass a measured one when the fleet has it.
    """
    if tokens < 0 or params < 1 or tokens_per_second_at_8b <= 0:
        raise ValueError(f"need tokens >= 0, params >= 1 and a positive rate, got {tokens}, {params}, "
                         f"{tokens_per_second_at_8b}")
    return tokens * (params / 8e9) / tokens_per_second_at_8b


@dataclass(frozen=True)
class MemoryCalibration:
    """observed / predicted device memory for one compatibility key; multiplies every estimate for that key."""

    factor: float = 1.0
    observations: int = 0


def calibrate(model: MemoryCalibration, observed_peak: int, predicted: int, smoothing: float = 0.2
              ) -> MemoryCalibration:
    """Fold one reported peak into the calibration.

    `predicted` is the uncalibrated estimate (base + cohort jobs) for the executor that reported `observed_peak`.
    Under-estimates are corrected at once (an OOM costs far more than idle memory); over-estimates decay slowly
    by exponential smoothing so one quiet step does not shrink the safety margin.
    """
    if predicted <= 0 or observed_peak <= 0:
        raise ValueError(f"observed_peak and predicted must be positive, got {observed_peak} and {predicted}")
    if not 0 < smoothing <= 1:
        raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
    ratio = observed_peak / predicted
    if model.observations == 0 or ratio > model.factor:
        factor = ratio
    else:
        factor = model.factor + smoothing * (ratio - model.factor)
    return MemoryCalibration(factor=factor, observations=model.observations + 1)


def cohort_bytes(jobs: Sequence, max_pass_tokens: Optional[int]) -> float:
    """Bytes a cohort of `jobs` adds to its base (uncalibrated).

    Without passes a step holds every job's micro-batch activations at once: the sum of the jobs' bytes. An executor
    started with `--max-pass-tokens N` runs the forward + backward in passes of whole sequences of at most N tokens
    (a longer sequence is a pass of its own), so it holds one pass's activations: bytes per token x
    min(the cohort's tokens, max(N, its longest sequence)), next to every job's adapter state.
    """
    return _CohortMemory().add_all(jobs).bytes(max_pass_tokens)


class _CohortMemory:
    """The sums `cohort_bytes` needs, kept as jobs join so the planner prices a join in O(1)."""

    __slots__ = ("state", "activations", "tokens", "per_token", "longest")

    def __init__(self):
        self.state, self.activations, self.tokens, self.per_token, self.longest = 0, 0, 0, 0.0, 0

    def add_all(self, jobs) -> "_CohortMemory":
        for job in jobs:
            self.add(job)
        return self

    def add(self, job) -> None:
        self.state += job.job_bytes - job.activation_bytes
        self.activations += job.activation_bytes
        self.tokens += job.tokens_per_step
        if job.tokens_per_step:
            self.per_token = max(self.per_token, job.activation_bytes / job.tokens_per_step)
        self.longest = max(self.longest, job.max_seq_len)

    def copy(self) -> "_CohortMemory":
        copied = _CohortMemory()
        copied.state, copied.activations, copied.tokens, copied.per_token, copied.longest = (
            self.state, self.activations, self.tokens, self.per_token, self.longest)
        return copied

    def with_job(self, job) -> "_CohortMemory":
        joined = self.copy()
        joined.add(job)
        return joined

    def bytes(self, max_pass_tokens: Optional[int]) -> float:
        if max_pass_tokens is None:
            return self.state + self.activations
        held_tokens = min(self.tokens, max(max_pass_tokens, self.longest))
        return self.state + min(self.activations, self.per_token * held_tokens)


def pass_tokens(planned: int, free_bytes: float, bytes_per_token: float) -> int:
    """Tokens per pass for an executor the planner counts on passes of `planned` tokens: the most whose activations
    fit in `free_bytes` (its usable memory less what is allocated before the step), never fewer than `planned`.
    Fewer, larger passes are faster: each pass pays the step's host time again."""
    if bytes_per_token <= 0 or free_bytes <= 0:
        return planned
    return max(planned, int(free_bytes // bytes_per_token))


@dataclass(frozen=True)
class JobSize:
    """A job's bytes in one compute dtype, uncalibrated: what it adds to a cohort, its base, and the generation pool
    an executor serving that base holds beside the cohort."""

    job_bytes: int  # adapter state + one micro-batch's activations
    activation_bytes: int  # the activations part of job_bytes
    base_bytes: int  # the frozen base it needs
    # `generation_pool_bytes` of its base: exact (the executor allocates what this says), so never calibrated; 0 where
    # its cohort serves no generation (a GaLore job's) or for a plan stored before pools were planned
    pool_bytes: int = 0


def size_job(shape: ModelShape, r: int, target_modules: Sequence[str], batch_size: int, max_seq_len: int,
             quantization: str, dtype: str, dora: bool = False, target_parameters: Sequence[str] = ()) -> JobSize:
    return JobSize(
        estimate_job_bytes(shape, r, target_modules, batch_size, max_seq_len, dtype, dora, target_parameters),
        estimate_activation_bytes(shape, batch_size, max_seq_len, dtype),
        estimate_base_bytes(shape.num_params(), quantization, dtype),
        generation_pool_bytes(shape, dtype),
    )


@dataclass(frozen=True)
class JobPlan:
    """Everything the planner needs to know of a job, decided once at submission and stored with it (job field
    `plan`), so that no round re-reads its spec, its base model or its data."""

    compat_key: str
    base_snapshot: str  # the resolved base model directory, pinned: submission, planning and training see one base
    params: int  # parameters of the base
    tokens_per_step: int  # micro_batch_sequences * max_seq_len: the tokens of one micro-batch
    max_seq_len: int
    tokens: int  # tokens of the whole run: its step budget's micro-batches, or its dataset's tokens x epochs
    est_gpu_seconds: float
    dtype: str  # JobSpec.dtype ("auto" or a compute dtype)
    sizes: Mapping[str, JobSize]  # effective compute dtype -> its size; one entry per `possible_dtypes(dtype)`

    def size(self, device_auto_dtype: str) -> JobSize:
        return self.sizes[effective_dtype(self.dtype, device_auto_dtype)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "JobPlan":
        raw = json.loads(text)
        raw["sizes"] = {dtype: JobSize(**size) for dtype, size in raw["sizes"].items()}
        return cls(**raw)


def micro_batch_sequences(method: str, batch_size: int) -> int:
    """Sequences one micro-batch of `batch_size` examples packs: a preference pair (dpo, simpo, orpo) is two, its
    chosen and its rejected answer each with the prompt. (DPO's reference forward runs them once more without a
    gradient, before the step's forward: it keeps nothing.)"""
    return 2 * batch_size if method in PREFERENCE_METHODS else batch_size


def plan_job(compat_key: str, base_snapshot: str, shape: ModelShape, r: int, target_modules: Sequence[str],
             batch_size: int, max_seq_len: int, quantization: str, dtype: str, tokens: int,
             dora: bool = False, target_parameters: Sequence[str] = (), method: str = "sft") -> JobPlan:
    """Size a job for every dtype it may compute in (`dora`: the adapter is DoRA; `target_parameters`: the expert
    parameters it adapts; `method`: its JobSpec.method, a preference method's pairs two sequences each;
    `estimate_job_bytes`)."""
    sequences = micro_batch_sequences(method, batch_size)
    sizes = {d: size_job(shape, r, target_modules, sequences, max_seq_len, quantization, d, dora, target_parameters)
             for d in possible_dtypes(dtype)}
    params = shape.num_params()
    return JobPlan(compat_key, base_snapshot, params, sequences * max_seq_len, max_seq_len, tokens,
                   estimate_gpu_seconds(tokens, params), dtype, sizes)


def plan_lopa_job(compat_key: str, base_snapshot: str, shape: ModelShape, num_virtual_tokens: int, rank: int,
                  head_size: int, batch_size: int, max_seq_len: int, quantization: str, dtype: str,
                  tokens: int) -> JobPlan:
    """`plan_job` for a LoPA job (`size_lopa_job`). Its sequences are m rows longer than max_seq_len in the packed
    row, and its plan says so: tokens_per_step and max_seq_len count the prompt rows (what a pass holds), while
    its target tokens are those of its data alone."""
    sizes = {d: size_lopa_job(shape, num_virtual_tokens, rank, head_size, batch_size, max_seq_len, quantization, d)
             for d in possible_dtypes(dtype)}
    params, rows = shape.num_params(), max_seq_len + num_virtual_tokens
    return JobPlan(compat_key, base_snapshot, params, batch_size * rows, rows, tokens,
                   estimate_gpu_seconds(tokens, params), dtype, sizes)


def plan_galore_job(compat_key: str, base_snapshot: str, shape: ModelShape, rank: int, proj_type: str,
                    target_modules: Sequence[str], batch_size: int, max_seq_len: int, dtype: str,
                    tokens: int) -> JobPlan:
    """`plan_job` for a GaLore job (`size_galore_job` in every dtype it may compute in); its `compat_key` is its
    own, so that no other job joins its cohort; its GPU time a full fine-tune's (`FULL_FINE_TUNE_FLOPS` times an
    adapter's). ValueError for a base the GaLore sizing does not know."""
    sizes = {d: size_galore_job(shape, rank, proj_type, target_modules, batch_size, max_seq_len, d)
             for d in possible_dtypes(dtype)}
    params = shape.num_params()
    return JobPlan(compat_key, base_snapshot, params, batch_size * max_seq_len, max_seq_len, tokens,
                   estimate_gpu_seconds(tokens, params) * FULL_FINE_TUNE_FLOPS, dtype, sizes)
