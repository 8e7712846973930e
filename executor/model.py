"""Load the frozen base once, and the packed-sequence attention the cohort batch needs.

The cohort batch is one row (batch dim 1) holding every sequence of every job back to back. Attention must stay
inside each sequence, so the model runs with our own attention implementation, `packed_attention`, which attends
per sequence given the sequence boundaries (`cu_seq_lens_q`, the flash-attention varlen convention that
`transformers` forwards to the attention function). Besides being exact, attending per sequence keeps one job's rows
from ever touching another's: a NaN in one job cannot leak into the others through a masked-out attention product.
Where varlen flash attention applies (a GPU), `packed_attention` hands the whole row to it (executor/attention.py);
elsewhere it loops over the sequences with SDPA.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from lorafleet.scheduler.memory import auto_dtype, effective_dtype
from lorafleet.executor.attention import varlen_packed_attention, varlen_supported

PACKED_ATTENTION = "lorafleet_packed"

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                     softcap=None, **kwargs):
    """Causal attention within each packed sequence. query [1, H, T, D], key/value [1, H_kv, T, D] -> [1, T, H, D].
    `softcap`: Gemma 2's tanh cap on the attention scores."""
    if softcap is None and varlen_supported(query, key, scaling, sliding_window):
        max_length = kwargs.get("max_length_q") or int(kwargs["cu_seq_lens_q"].diff().max())
        boundaries = kwargs["cu_seq_lens_q"]
        return varlen_packed_attention(query, key, value, boundaries, max_length, scaling, sliding_window), None
    # split, not slicing: the backward of a slice is a zero-filled [T, ...] tensor per sequence, of split one concat.
    lengths = kwargs["cu_seq_lens_q"].diff().tolist()
    groups = query.shape[1] // key.shape[1]
    outputs = []
    for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)):
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        length = q.shape[2]
        if softcap is not None:
            mask = _causal_mask(length, sliding_window, q.device)
            outputs.append(_softcapped_attention(q, k, v, scaling, softcap, mask))
        elif sliding_window is not None and length > sliding_window:
            mask = _causal_mask(length, sliding_window, q.device)
            outputs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling))
        else:
            outputs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _causal_mask(length: int, sliding_window: int | None, device) -> torch.Tensor:
    """[T, T] True where a row may attend: itself and earlier positions, within the window when there is one."""
    rows = torch.arange(length, device=device)
    offset = rows[:, None] - rows[None, :]
    return (offset >= 0) & (offset < (sliding_window or length))


def _softcapped_attention(q, k, v, scaling, softcap: float, mask: torch.Tensor) -> torch.Tensor:
    """Attention with the scores capped as softcap * tanh(scores / softcap) (SDPA has no cap), as HF's eager does."""
    scores = torch.matmul(q, k.transpose(2, 3)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
# The sequence boundaries are the whole mask; telling transformers so keeps it from building a [T, T] mask.
AttentionMaskInterface.register(PACKED_ATTENTION, lambda *args, **kwargs: None)


def packing_kwargs(sequence_lengths: list[int], device) -> dict:
    """Model inputs that describe a packed row: positions restart at 0 in each sequence, plus the boundaries."""
    boundaries = torch.tensor([0, *sequence_lengths], device=device).cumsum(0)
    position_ids = torch.cat([torch.arange(n, device=device) for n in sequence_lengths]).unsqueeze(0)
    longest = max(sequence_lengths)
    return {
        "position_ids": position_ids,
        "cu_seq_lens_q": boundaries,
        "cu_seq_lens_k": boundaries,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder's repeated layers: `layers` in most families, `h` in GPT-2's."""
    for name in ("layers", "h"):
        layers = getattr(model.base_model, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ValueError(f"{type(model).__name__}: cannot find its decoder layers (expected 'layers' or 'h')")


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes in bf16 natively: the CPU does (slowly), a GPU from Ampere on; older GPUs only
    emulate it, far slower than fp32."""
    if device.type != "cuda":
        return True
    return torch.cuda.is_bf16_supported(including_emulation=False)


def device_auto_dtype(device: torch.device) -> str:
    """What `dtype: auto` computes in on this device (the rule is `memory.auto_dtype`, shared with the planner)."""
    return auto_dtype(device.type, native_bf16(device))


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype a job of JobSpec.dtype `dtype` computes in here (`memory.effective_dtype`)."""
    return DTYPES[effective_dtype(dtype, device_auto_dtype(device))]


def quantization_config(quantization: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if quantization == "none":
        return None
    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {quantization!r}; expected 'none', 'nf4' or 'int8'")


def load_base(path: str | Path, quantization: str = "none", dtype: str = "auto", device: str = "cpu"):
    """Load a causal LM and its tokenizer from a local directory, frozen and in eval mode (no base dropout)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"base model {str(path)!r}: no config.json there (expected a local model directory)")
    device = resolve_device(device)
    dtype_ = compute_dtype(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype_,
        attn_implementation=PACKED_ATTENTION,
        quantization_config=quantization_config(quantization, dtype_),
        device_map={"": device} if quantization != "none" else None,
        local_files_only=True,
    )
    if quantization == "none":
        model.to(device)
    model.requires_grad_(False)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer
