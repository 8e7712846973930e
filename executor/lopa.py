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

The packed layout (what the cohort feeds the base with `inputs_embeds`): each sequence's m prompt rows sit right
before its own rows, the positions run 0 .. m + L - 1 over prompt and sequence together (one packed sequence, as
prompt tuning numbers them), and no prompt row is a target, so a job's loss is over the same tokens as without LoPA.

As a job (`adapter.type: lopa`): `LopaAdapter` holds the generator where the cohort expects an adapter; a pass lays
out every job's rows with `prompt_pass` (a sequence's input rows: `input_length`, those before its first target);
the export is `LOPA_CONFIG` + `LOPA_WEIGHTS` (`save_lopa`), which `load_lopa` and `lopa_logits` run on a plain
Hugging Face base with the cohort's logits.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorafleet.executor.adapters import Adapter
from lorafleet.executor.checkpoint import ExportFiles, HostCopy
from lorafleet.executor.data import IGNORE_INDEX
from lorafleet.scheduler.memory import lopa_parameter_count  # noqa: F401 (the memory model's count, one definition)
from lorafleet.scheduler.spec import AdapterSpec

LOPA_CONFIG = "lopa_config.json"
LOPA_WEIGHTS = "lopa_model.safetensors"
LOPA_FORMAT = 1


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


def input_length(labels) -> int:
    """A sequence's input rows, the ones its prompt is computed from: those before its first target (labels are
    aligned with the tokens, `formats`), or all of it when it has none (its targets truncated away)."""
    for index, label in enumerate(labels):
        if label != IGNORE_INDEX:
            return index
    return len(labels)


class LopaAdapter(Adapter):
    """A LoPA job's trainable part behind the interface the cohort drives (optimizer groups, checkpoint state, a
    dropout stream it never draws from): its generator `prompt`. It adapts no layer (`layer_names` is empty): the
    cohort feeds its prompts in with the input embeddings (`prompt_pass`)."""

    def __init__(self, spec: AdapterSpec, hidden_size: int, seed: int):
        super().__init__(spec, {}, seed)
        settings = spec.lopa
        with torch.random.fork_rng(devices=[]):  # the job's own init from its seed, whoever else is in the cohort
            torch.manual_seed(seed)
            self.prompt = LopaPrompt(settings.num_virtual_tokens, hidden_size, settings.rank, settings.head_size)


@dataclass
class PromptedPass:
    """A cohort pass's packed row with every LoPA sequence's prompt rows prepended (`prompt_pass`)."""

    embeds: torch.Tensor  # [T', d]: what the base is fed as inputs_embeds
    targets: torch.Tensor  # [T'], IGNORE_INDEX on every prompt row
    sequence_lengths: list[int]  # the model's packed sequences: a LoPA sequence's m + L, another's L
    rows: dict[str, tuple[int, int]]  # each job's rows in this layout (the routing's segments)
    # [T] int64: the rows that are not prompt rows, in order: selecting them gives back the pass's own layout (an
    # index made on the host, so that dropping the prompt rows does not wait for the device as a mask would)
    kept: torch.Tensor


def prompt_pass(embeds: torch.Tensor, targets: torch.Tensor, rows: dict[str, tuple[int, int]],
                job_sequences: dict[str, list[int]], prompts: dict[str, torch.Tensor]) -> PromptedPass:
    """Lay out a pass's jobs in their order, each LoPA job's (those in `prompts`: [n, m, d]) through `prepend_prompts`,
    every other job's rows unchanged, bit for bit. `rows` must cover embeds [T, d] back to back (an eager pass)."""
    parts, part_targets, lengths, moved, kept, start, covered = [], [], [], {}, [], 0, 0
    for job_id, (begin, end) in rows.items():
        sequences = job_sequences[job_id]
        if begin != covered or sum(sequences) != end - begin:
            raise ValueError(f"job {job_id}: rows {begin}..{end} are not the next {sum(sequences)} rows after "
                             f"{covered} (a padded layout cannot take prompts)")
        covered = end
        if job_id in prompts:
            row = prepend_prompts(embeds[begin:end], targets[begin:end], sequences, prompts[job_id])
            m = prompts[job_id].shape[1]
            kept += [torch.arange(first + m, first + length) for first, length in
                     zip(itertools.accumulate(row.sequence_lengths, initial=start), row.sequence_lengths)]
            parts.append(row.embeds)
            part_targets.append(row.targets)
            lengths += row.sequence_lengths
        else:
            kept.append(torch.arange(start, start + end - begin))
            parts.append(embeds[begin:end])
            part_targets.append(targets[begin:end])
            lengths += sequences
        moved[job_id] = (start, start + parts[-1].shape[0])
        start += parts[-1].shape[0]
    return PromptedPass(torch.cat(parts), torch.cat(part_targets), lengths, moved,
                        torch.cat(kept).to(embeds.device))


def lopa_config(adapter: LopaAdapter, base_model: str) -> dict:
    """What `load_lopa` needs to rebuild the generator, and what it is: the export's `LOPA_CONFIG`."""
    prompt = adapter.prompt
    return {
        "format": LOPA_FORMAT,
        "adapter_type": "lopa",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": prompt.num_virtual_tokens,
        "hidden_size": prompt.shared.shape[1],
        "encoder_size": prompt.u_head.dense.in_features,
        "rank": prompt.u_head.rank,
        "head_size": prompt.u_head.dense.out_features,
        "encoder": "mean of the base's input embeddings (get_input_embeddings) over the input tokens, those before "
                   "the first target",
        "prompt": "Z = Z_S * sigmoid(u v^T), prepended to the input embeddings; positions 0 .. m + L - 1",
    }


def save_lopa(directory: Path, adapter: LopaAdapter, base_model: str) -> None:
    """Write a LoPA job's export into `directory`: `LOPA_CONFIG` and `LOPA_WEIGHTS` (the generator's fp32 state:
    shared [m, d], u_head.* and v_head.*, nn.Linear's names), each replaced whole."""
    lopa_files(adapter, base_model).write(directory)


def lopa_files(adapter: LopaAdapter, base_model: str) -> ExportFiles:
    """`save_lopa`'s files as copies (on their way to the host), to be written later."""
    config = json.dumps(lopa_config(adapter, base_model), indent=2, sort_keys=True)
    return ExportFiles(HostCopy.start(lopa_tensors(adapter)), config, weights_name=LOPA_WEIGHTS,
                       config_name=LOPA_CONFIG)


def lopa_tensors(adapter: LopaAdapter) -> dict[str, torch.Tensor]:
    """The generator's state as its export's copy takes it (fp32)."""
    return {key: tensor.detach().float() for key, tensor in adapter.prompt.state_dict().items()}


def load_lopa(directory, device="cpu") -> LopaPrompt:
    """The generator a LoPA job exported into `directory` (fp32, eval mode), for `lopa_logits` on a plain Hugging
    Face base:

        base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
        prompt = load_lopa("adapter/")
        logits = lopa_logits(base, prompt, tokenizer(text)["input_ids"], input_length)
    """
    directory = Path(directory)
    try:
        config = json.loads((directory / LOPA_CONFIG).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory}: no {LOPA_CONFIG} (not a LoPA job's export)") from None
    if config.get("format") != LOPA_FORMAT or config.get("adapter_type") != "lopa":
        raise ValueError(f"{directory / LOPA_CONFIG}: format {config.get('format')!r} of "
                         f"{config.get('adapter_type')!r}, expected {LOPA_FORMAT} of 'lopa'")
    prompt = LopaPrompt(config["num_virtual_tokens"], config["hidden_size"], config["rank"], config["head_size"],
                        config["encoder_size"])
    prompt.load_state_dict(load_file(str(directory / LOPA_WEIGHTS)))
    return prompt.to(device).eval()


@torch.no_grad()
def soft_prompt(prompt: LopaPrompt, embeds: torch.Tensor) -> torch.Tensor:
    """[m, hidden]: the soft prompt of a sequence whose input rows (its prompt) embed to `embeds` [L, hidden], in
    their dtype: what generation places before the prompt, computed once (the answer's tokens never change it)."""
    return prompt.prompts(embeds, [len(embeds)], [len(embeds)])[0].to(embeds.dtype)


@torch.no_grad()
def lopa_logits(model, prompt: LopaPrompt, input_ids: list[int], input_length: int | None = None,
                **model_kwargs) -> torch.Tensor:
    """Next-token logits [L, vocab] of one sequence x with its own soft prompt: the base run on [Z(x), x] with
    inputs_embeds (positions 0 .. m + L - 1), the prompt's m rows dropped. `input_length`: x's input tokens, the ones
    Z is computed from (a record's prompt, before its answer; default all of x). `model_kwargs`: passed to the model
    (the cohort's packing inputs; none for a plain Hugging Face model)."""
    ids = torch.tensor(input_ids, device=model.device)
    embeds = model.get_input_embeddings()(ids)
    prompts = prompt.prompts(embeds, [len(input_ids)], [len(input_ids) if input_length is None else input_length])
    inputs = torch.cat([prompts[0].to(embeds.dtype), embeds])[None]
    return model(inputs_embeds=inputs, use_cache=False, **model_kwargs).logits[0, prompt.num_virtual_tokens:]
