"""The frozen decoder layer's elementwise work through fused kernels, for the Llama-family modules we know.

Hugging Face's Llama layer spends about as long in elementwise kernels as in its matmuls (RMSNorm in fp32 is six
kernels forward; SiLU and the gate·up product two; rotary slices, negates, concatenates, multiplies and adds; q/k/v
are transposed to [1, H, T, D] and copied back for flash attention). `fuse_decoder` swaps, per module instance, the
forward of:

- RMSNorm (Llama, Mistral, Qwen2, Qwen3, Phi-3, Qwen2-MoE): `kernels.rms_norm`, one read and one write, only x and
  1/rms saved;
- the SiLU MLP (Llama, Mistral, Qwen2, Qwen3, Qwen2-MoE's shared expert): `down(kernels.silu_mul(gate(x), up(x)))`,
  gate and up saved, no product;
- LlamaAttention on a packed row: q/k/v stay [T, H, D] views of the projections, `kernels.rotary` writes the rotated
  q and k, varlen flash attention reads them as they are, and o_proj reads its output without a copy;
- the decoder layer itself (Llama, Mistral, Qwen2, Qwen3), when every layer and the final norm qualify: a layer
  returns its residual and its MLP's output unadded (`ResidualStream`), and the next norm forms the sum as it
  normalises it (`kernels.add_rms_norm`: the sum written beside the normalised row; backward, the skip path's
  gradient added to the norm's in the same pass). The residual stream's four adds a layer (two forward, two gradient
  sums backward) leave the step.

q/k/v, and gate/up, read the same input: `multilora.shared_input_projections` gives each group one multi-adapter node
(one read of x for all their adapters' shrinks, one input gradient) when every job targets the whole group.

The kernels compute HF's formulas (kernels/reference.py), in fp32 with one rounding; on the CPU the references run,
so the CPU engine computes what HF's modules do. Modules of other classes (Gemma's (1 + w) norm, Phi-3's fused
gate_up_proj MLP, GPT-2's LayerNorm and GELU MLP, attention other than Llama's, ...) keep HF's forward.
"""

from __future__ import annotations

import types
from typing import NamedTuple

import torch
from torch import nn

from lorafleet.executor.attention import varlen_attention, varlen_supported
from lorafleet.executor.model import decoder_layers, packed_attention
from lorafleet.executor.multilora import shared_input_projections
from lorafleet.kernels import add_rms_norm, rms_norm, rotary, silu_mul

# Classes whose forward is Llama's formula under another family's name (Qwen3's q/k norms are RMSNorms too).
NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm", "Qwen2MoeRMSNorm"}
MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Qwen2MoeMLP"}
ATTENTIONS = {"LlamaAttention"}
# Decoder layers of the pre-norm form h += attn(norm1(h)); h += mlp(norm2(h)), their MLP returning a tensor.
LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}


class ResidualStream(NamedTuple):
    """What a fused decoder layer hands the next: the residual and its block's output, not yet added. The next norm
    (the next layer's first, or the model's last) adds them in the pass that normalises the sum."""

    residual: torch.Tensor
    delta: torch.Tensor


def fuse_decoder(model: nn.Module) -> int:
    """Swap the forwards described above on every module of `model` they apply to; return how many were swapped."""
    swapped = 0
    for module in model.modules():
        kind = type(module).__name__
        if _fusable_norm(module):
            module.forward = types.MethodType(_norm_forward, module)
        elif kind in MLPS and getattr(module.config, "hidden_act", None) == "silu":
            module.forward = types.MethodType(_mlp_forward, module)
        elif kind in ATTENTIONS:
            module.forward = types.MethodType(_packed_attention_forward, module)
        else:
            continue
        swapped += 1
    return swapped + _fuse_residual_adds(model)


def _fusable_norm(module) -> bool:
    """A norm whose forward `_norm_forward` takes: Llama's formula, frozen weight (the kernels compute no dweight)."""
    return type(module).__name__ in NORMS and not module.weight.requires_grad


def _fuse_residual_adds(model: nn.Module) -> int:
    """Swap every decoder layer's forward for `_layer_forward` when all of them and the final norm can take a
    `ResidualStream` (a pending add must reach a norm that forms it); return how many were swapped."""
    try:
        layers = decoder_layers(model)
    except ValueError:
        return 0
    if not _fusable_norm(getattr(model.base_model, "norm", None)):
        return 0
    if not all(type(layer).__name__ in LAYERS and _fusable_norm(layer.input_layernorm)
               and _fusable_norm(layer.post_attention_layernorm) for layer in layers):
        return 0
    for layer in layers:
        layer.forward = types.MethodType(_layer_forward, layer)
    return len(layers)


def _layer_forward(self, hidden_states, **kwargs):
    # HF's model calls its layers with keyword arguments only, all of them for the attention.
    residual, normed = _add_norm(hidden_states, self.input_layernorm)
    attended, _ = self.self_attn(hidden_states=normed, **kwargs)
    residual, normed = _add_norm(ResidualStream(residual, attended), self.post_attention_layernorm)
    return ResidualStream(residual, self.mlp(normed))


def _add_norm(stream, norm) -> tuple[torch.Tensor, torch.Tensor]:
    """(the residual stream's value, norm of it) for a stream that is a tensor or a pending `ResidualStream`."""
    if not isinstance(stream, ResidualStream):
        return stream, norm(stream)
    if stream.residual.dtype != norm.weight.dtype:  # HF promotes; the kernel wants one dtype
        total = stream.residual + stream.delta
        return total, norm(total)
    return add_rms_norm(stream.residual, stream.delta, norm.weight, norm.variance_epsilon)


def _norm_forward(self, hidden_states):
    if isinstance(hidden_states, ResidualStream):  # the model's last norm after fused layers
        return _add_norm(hidden_states, self)[1]
    if hidden_states.dtype != self.weight.dtype:  # HF promotes; the kernel wants one dtype
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    gate, up = shared_input_projections([self.gate_proj, self.up_proj], x)
    return self.down_proj(silu_mul(gate, up))


def _packed_attention_forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
    # The model runs with PACKED_ATTENTION (executor/model.py): one row [1, T, d] and the sequence boundaries.
    length = hidden_states.shape[1]
    cos, sin = (t[0] for t in position_embeddings)
    q, k, v = shared_input_projections([self.q_proj, self.k_proj, self.v_proj], hidden_states)
    q = rotary(q.view(length, -1, self.head_dim), cos, sin)
    k = rotary(k.view(length, -1, self.head_dim), cos, sin)
    v = v.view(length, -1, self.head_dim)
    boundaries = kwargs["cu_seq_lens_q"]
    if varlen_supported(q, k, self.scaling, None):  # reads the head counts from dim 1, as laid out here
        max_length = kwargs.get("max_length_q") or int(boundaries.diff().max())
        out = varlen_attention(q, k, v, boundaries, max_length, self.scaling, None)
    else:
        heads_first = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        out = packed_attention(self, *heads_first, None, scaling=self.scaling, **kwargs)[0][0]
    return self.o_proj(out.reshape(1, length, -1)), None
