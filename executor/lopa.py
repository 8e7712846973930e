"""LoPA (low-rank prompt adaptation): one job's per-instance soft prompt, and the packed row with prompts prepended.

What the paper (Jain et al., "Prompt Tuning Strikes Back: Customizing Foundation Models with Low-Rank Prompt
Adaptation", NeurIPS 2024; ../shared/seeds holds only its abstract, so the details below follow the authors' public
code, jabhinav/Prompt-Tuning-Strikes-Back-with-LOPA: LatentPromptAttentionGenerator and LOPA.forward) defines: every
input x gets its own soft prompt of m virtual tokens,

    Z(x) = Z_S ∘ g(u(x) v(x)ᵀ)                                    [m, d]

Z_S [m, d] is the task-shared soft prompt, ∘ the elementwise product, g = sigmoid (a gate in (0, 1) on each entry of
Z_S), and u(x) [m, r], v(x) [d, r] the rank-r factors of the instance-specific part Z_I = u vᵀ. Both factors come
from an encoding e(x) [d_e] of the input by a frozen encoder, each through its own two-layer head:

    u(x) = reshape(W_u2 tanh(W_u1 e(x) + b_u1) + b_u2, [m, r])      W_u1 [h, d_e], W_u2 [m r, h]
    v(x) = reshape(W_v2 tanh(W_v1 e(x) + b_v1) + b_v2, [d, r])      W_v1 [h, d_e], W_v2 [d r, h]

The prompt Z(x) is prepended to the input's token embeddings and the frozen foundation model runs as usual; only
Z_S and the two heads train: m d + 2 (d_e h + h) + h (m + d) r + (m + d) r parameters (`lopa_parameter_count`),
independent of the base's depth.

Where this differs from the paper, and why:
- The encoder. The paper encodes x with a separate frozen encoder model (CodeSage, CodeBERT, ...). lorafleet keeps no
  second model per job, so e(x) is the mean of the frozen base's own input embeddings over the sequence's input rows
  (its prompt, not its answer: the answer must not shape the prompt that predicts it). That is the simplest encoder
  the method admits (d_e = d); a richer one (a base layer's pooled output) only changes `pool_inputs`.
- No dropout in the heads (the paper's code applies the encoder's hidden dropout before each head): the generator is
  then a pure function of its parameters and the input, so gradients are checkable and resumes are bitwise.

The packed layout (what the cohort will feed the base with `inputs_embeds`): each sequence's m prompt rows sit right
before its own rows, the positions run 0 .. m + L - 1 over prompt and sequence together (one packed sequence, as
prompt tuning numbers them), and no prompt row is a target, so a job's loss is over the same tokens as without LoPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.executor.data import IGNORE_INDEX


def lopa_parameter_count(num_virtual_tokens: int, hidden_size: int, encoder_size: int, head_size: int,
                         rank: int) -> int:
    """The generator's count: Z_S (m d), the u head (d_e h + h + h m r + m r), the v head (d_e h + h + h d r + d r)."""
    m, d, d_e, h, r = num_virtual_tokens, hidden_size, encoder_size, head_size, rank
    return m * d + 2 * (d_e * h + h) + h * (m + d) * r + (m + d) * r


def check_lopa_inputs(embeds: torch.Tensor, sequence_lengths: list[int], input_lengths: list[int]) -> None:
    """Raise ValueError naming the problem: embeds [T, d] with T = Σ lengths, 1 <= input_lengths[i] <= lengths[i]."""
    if embeds.dim() != 2:
        raise ValueError(f"embeds must be [T, d], got shape {tuple(embeds.shape)}")
    if sum(sequence_lengths) != embeds.shape[0]:
        raise ValueError(f"sequence_lengths sum to {sum(sequence_lengths)}, embeds has {embeds.shape[0]} rows")
    if len(input_lengths) != len(sequence_lengths):
        raise ValueError(f"{len(input_lengths)} input_lengths for {len(sequence_lengths)} sequences")
    for i, (inputs, length) in enumerate(zip(input_lengths, sequence_lengths)):
        if not 1 <= inputs <= length:
            raise ValueError(f"sequence {i}: input_lengths {inputs} must be in 1..{length} (its length)")


def pool_inputs(embeds: torch.Tensor, sequence_lengths: list[int], input_lengths: list[int]) -> torch.Tensor:
    """e(x) for each sequence [n, d]: the mean of its first input_lengths[i] rows of embeds [T, d]."""
    check_lopa_inputs(embeds, sequence_lengths, input_lengths)
    return torch.stack([sequence[:inputs].mean(dim=0)
                        for sequence, inputs in zip(embeds.split(sequence_lengths), input_lengths)])


class LopaHead(torch.nn.Module):
    """One factor's head: e [n, d_e] -> tanh(e W1ᵀ + b1) W2ᵀ + b2 reshaped to [n, rows, rank]."""

    def __init__(self, encoder_size: int, head_size: int, rows: int, rank: int, init_std: float):
        super().__init__()
        self.rows, self.rank = rows, rank
        self.dense = torch.nn.Linear(encoder_size, head_size)
        self.out = torch.nn.Linear(head_size, rows * rank)
        # As the paper's code initializes its heads: normal weights, a zero output bias.
        torch.nn.init.normal_(self.dense.weight, std=init_std)
        torch.nn.init.normal_(self.out.weight, std=init_std)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, encoded: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.dense(encoded))).view(-1, self.rows, self.rank)


class LopaPrompt(torch.nn.Module):
    """One LoPA job's trainable parameters: Z_S [m, d], the u head and the v head; the gate g is sigmoid."""

    def __init__(self, num_virtual_tokens: int, hidden_size: int, rank: int, head_size: int,
                 encoder_size: int | None = None, init_std: float = 0.02):
        super().__init__()
        encoder_size = encoder_size or hidden_size
        self.shared = torch.nn.Parameter(torch.randn(num_virtual_tokens, hidden_size) * init_std)
        self.u_head = LopaHead(encoder_size, head_size, num_virtual_tokens, rank, init_std)
        self.v_head = LopaHead(encoder_size, head_size, hidden_size, rank, init_std)

    @property
    def num_virtual_tokens(self) -> int:
        return self.shared.shape[0]

    def forward(self, encoded: torch.Tensor) -> torch.Tensor:
        """Z for each input: encoded [n, d_e] -> [n, m, d] = Z_S ∘ sigmoid(u vᵀ)."""
        instance = torch.bmm(self.u_head(encoded), self.v_head(encoded).transpose(1, 2))
        return self.shared * torch.sigmoid(instance)

    def prompts(self, embeds: torch.Tensor, sequence_lengths: list[int], input_lengths: list[int]) -> torch.Tensor:
        """The soft prompts [n, m, d] of the packed sequences of embeds [T, d] (input rows pooled per sequence)."""
        # pooled in the parameters' dtype (fp32 beside a bf16 base): a mean of bf16 rows would round each partial sum
        return self(pool_inputs(embeds.to(self.shared.dtype), sequence_lengths, input_lengths))


def lopa_prompts_reference(embeds, sequence_lengths, input_lengths, shared, u_head, v_head) -> torch.Tensor:
    """Float64 definition of the prompts [n, m, d], one sequence at a time, the formula written out.

    u_head / v_head: (W1 [h, d_e], b1 [h], W2 [rows r, h], b2 [rows r]) with rows m for u, d for v."""
    check_lopa_inputs(embeds, sequence_lengths, input_lengths)
    m, d = shared.shape
    shared = shared.double()
    prompts, start = [], 0
    for length, inputs in zip(sequence_lengths, input_lengths):
        encoded = embeds[start:start + inputs].double().sum(dim=0) / inputs
        u = _head_reference(encoded, u_head).reshape(m, -1)
        v = _head_reference(encoded, v_head).reshape(d, -1)
        prompts.append(shared * torch.sigmoid(u @ v.T))
        start += length
    return torch.stack(prompts)


def _head_reference(encoded: torch.Tensor, head) -> torch.Tensor:
    w1, b1, w2, b2 = (t.double() for t in head)
    return w2 @ torch.tanh(w1 @ encoded + b1) + b2


def head_tensors(head: LopaHead) -> tuple[torch.Tensor, ...]:
    """(W1, b1, W2, b2) of a head, the form `lopa_prompts_reference` takes."""
    return head.dense.weight, head.dense.bias, head.out.weight, head.out.bias


@dataclass
class PromptedRow:
    """A packed row with each sequence's soft prompt prepended, ready for `model(inputs_embeds=...)`."""

    embeds: torch.Tensor  # [T + n m, d]
    targets: torch.Tensor  # [T + n m], IGNORE_INDEX on every prompt row
    sequence_lengths: list[int]  # each sequence's m + L: the model's packed sequences (positions restart in each)
    prompt_rows: torch.Tensor  # [T + n m] bool, True on prompt rows


def prepend_prompts(embeds: torch.Tensor, targets: torch.Tensor, sequence_lengths: list[int],
                    prompts: torch.Tensor) -> PromptedRow:
    """Lay out [Z_1, x_1, Z_2, x_2, ...]: prompts [n, m, d] each before its own sequence of embeds [T, d].

    targets [T] are each sequence's own (shifted within it, as `cohort.pack` makes them); prompt rows get
    IGNORE_INDEX, so the loss counts the same tokens as without the prompt."""
    n, m, _ = prompts.shape
    if n != len(sequence_lengths):
        raise ValueError(f"{n} prompts for {len(sequence_lengths)} sequences")
    if targets.shape != embeds.shape[:1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match embeds rows {embeds.shape[0]}")
    prompts = prompts.to(embeds.dtype)
    ignored = targets.new_full((m,), IGNORE_INDEX)
    rows, row_targets, is_prompt = [], [], []
    for prompt, sequence, sequence_targets in zip(prompts, embeds.split(sequence_lengths),
                                                  targets.split(sequence_lengths)):
        rows += [prompt, sequence]
        row_targets += [ignored, sequence_targets]
        is_prompt += [torch.ones(m, dtype=torch.bool), torch.zeros(sequence.shape[0], dtype=torch.bool)]
    return PromptedRow(torch.cat(rows), torch.cat(row_targets), [m + length for length in sequence_lengths],
                       torch.cat(is_prompt).to(embeds.device))
