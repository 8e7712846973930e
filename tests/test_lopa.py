"""LoPA's math (executor/lopa.py) on the CPU: the generator against its float64 definition and gradcheck, the packed
layout with prompts prepended, a prompt that depends on its own sequence only, the paper's parameter count, and a
tiny Llama fed the prompted row with `inputs_embeds` that trains the LoPA parameters and leaves the base alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_models import llama, single_torch_thread  # noqa: F401 (fixtures)
from transformers import AutoModelForCausalLM

from lorafleet.executor.data import IGNORE_INDEX
from lorafleet.executor.lopa import (
    LopaPrompt,
    head_tensors,
    lopa_parameter_count,
    lopa_prompts_reference,
    pool_inputs,
    prepend_prompts,
)
from lorafleet.executor.model import PACKED_ATTENTION, packing_kwargs

M, D, RANK, HEAD = 3, 8, 2, 5
LENGTHS, INPUTS = [4, 6, 5], [2, 3, 5]


def generator(dtype=torch.float32, seed=0) -> LopaPrompt:
    torch.manual_seed(seed)
    # a larger init than the default so the gate sigmoid(u vᵀ) is far from 1/2 and the checks see its curvature
    return LopaPrompt(M, D, RANK, HEAD, init_std=0.7).to(dtype)


def reference(lopa: LopaPrompt, embeds: torch.Tensor) -> torch.Tensor:
    return lopa_prompts_reference(embeds, LENGTHS, INPUTS, lopa.shared, head_tensors(lopa.u_head),
                                  head_tensors(lopa.v_head))


def test_prompts_equal_the_float64_definition():
    lopa = generator()
    embeds = torch.randn(sum(LENGTHS), D)
    prompts = lopa.prompts(embeds, LENGTHS, INPUTS)
    assert prompts.shape == (len(LENGTHS), M, D)
    expected = reference(lopa, embeds)
    torch.testing.assert_close(prompts.double(), expected, rtol=1e-5, atol=1e-6)
    # the instance part matters: sequences get different prompts, none of them Z_S / 2 (the gate at u vᵀ = 0)
    assert not torch.allclose(prompts[0], prompts[1])
    assert not torch.allclose(prompts[0], lopa.shared / 2, atol=1e-3)


def test_gradients_equal_the_float64_definitions_gradients():
    lopa = generator(torch.float64)
    embeds = torch.randn(sum(LENGTHS), D, dtype=torch.float64)
    weights = torch.randn(len(LENGTHS), M, D, dtype=torch.float64)
    (lopa.prompts(embeds, LENGTHS, INPUTS) * weights).sum().backward()
    produced = [p.grad.clone() for p in lopa.parameters()]
    lopa.zero_grad()
    (reference(lopa, embeds) * weights).sum().backward()
    for grad, expected in zip(produced, (p.grad for p in lopa.parameters())):
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_generator_passes_gradcheck_in_float64():
    lopa = generator(torch.float64)
    embeds = torch.randn(sum(LENGTHS), D, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in lopa.named_parameters()]

    def prompts(embeds, *params):  # the generator as a function of the input and every parameter
        return torch.func.functional_call(lopa, dict(zip(names, params)), (pool_inputs(embeds, LENGTHS, INPUTS),))

    params = [p.detach().clone().requires_grad_() for p in lopa.parameters()]
    assert torch.autograd.gradcheck(prompts, (embeds, *params))


def test_parameter_count_is_the_papers_formula():
    for m, d, rank, head in [(M, D, RANK, HEAD), (10, 64, 4, 32), (1, 16, 1, 7)]:
        lopa = LopaPrompt(m, d, rank, head)
        produced = sum(p.numel() for p in lopa.parameters())
        assert produced == lopa_parameter_count(m, d, d, head, rank)
        assert produced == m * d + 2 * (d * head + head) + head * (m + d) * rank + (m + d) * rank


def test_each_sequence_gets_its_prompt_rows_before_it_and_no_targets_there():
    lopa = generator()
    embeds = torch.randn(sum(LENGTHS), D)
    targets = torch.arange(100, 100 + sum(LENGTHS))
    prompts = lopa.prompts(embeds, LENGTHS, INPUTS)
    row = prepend_prompts(embeds, targets, LENGTHS, prompts)
    assert row.sequence_lengths == [M + n for n in LENGTHS]
    assert row.embeds.shape == (sum(LENGTHS) + M * len(LENGTHS), D)
    start, source = 0, 0
    for i, length in enumerate(LENGTHS):
        assert torch.equal(row.embeds[start:start + M], prompts[i])
        assert (row.targets[start:start + M] == IGNORE_INDEX).all()
        assert row.prompt_rows[start:start + M].all() and not row.prompt_rows[start + M:start + M + length].any()
        assert torch.equal(row.embeds[start + M:start + M + length], embeds[source:source + length])
        assert torch.equal(row.targets[start + M:start + M + length], targets[source:source + length])
        start, source = start + M + length, source + length
    # positions: 0 .. m + L - 1 over each prompt and its sequence, restarting at every prompt
    positions = packing_kwargs(row.sequence_lengths, "cpu")["position_ids"][0]
    expected = torch.cat([torch.arange(M + n) for n in LENGTHS])
    assert torch.equal(positions, expected)
    assert positions[row.prompt_rows].tolist() == list(range(M)) * len(LENGTHS)


def test_a_prompt_does_not_change_when_another_sequence_of_the_batch_changes():
    lopa = generator()
    embeds = torch.randn(sum(LENGTHS), D)
    before = lopa.prompts(embeds, LENGTHS, INPUTS)
    changed = embeds.clone()
    changed[:LENGTHS[0]] = torch.randn(LENGTHS[0], D) * 3  # the first sequence only
    after = lopa.prompts(changed, LENGTHS, INPUTS)
    assert not torch.equal(after[0], before[0])
    assert torch.equal(after[1:], before[1:])
    # a longer first sequence moves the others' rows; their prompts stay bitwise equal
    longer = torch.cat([torch.randn(LENGTHS[0] + 3, D), embeds[LENGTHS[0]:]])
    moved = lopa.prompts(longer, [LENGTHS[0] + 3, *LENGTHS[1:]], INPUTS)
    assert torch.equal(moved[1:], before[1:])


def test_a_prompt_sees_only_its_sequences_input_rows_not_its_answer():
    lopa = generator()
    embeds = torch.randn(sum(LENGTHS), D)
    changed = embeds.clone()
    changed[INPUTS[0]:LENGTHS[0]] += 1.0  # the answer rows of the first sequence
    assert torch.equal(lopa.prompts(changed, LENGTHS, INPUTS), lopa.prompts(embeds, LENGTHS, INPUTS))


@pytest.mark.parametrize("lengths, inputs, problem", [
    ([4, 11], [2, 3, 5], "3 input_lengths for 2 sequences"),
    ([4, 6, 4], INPUTS, "sequence_lengths sum to 14"),
    (LENGTHS, [2, 0, 5], "sequence 1: input_lengths 0"),
    (LENGTHS, [2, 7, 5], "sequence 1: input_lengths 7 must be in 1..6"),
])
def test_bad_boundaries_are_named(lengths, inputs, problem):
    with pytest.raises(ValueError, match=problem):
        generator().prompts(torch.randn(sum(LENGTHS), D), lengths, inputs)


def frozen_llama(directory, attention=PACKED_ATTENTION):
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation=attention, dtype=torch.float32)
    return model.requires_grad_(False)


def packed_logits(model, row) -> torch.Tensor:
    kwargs = packing_kwargs(row.sequence_lengths, "cpu")
    return model(inputs_embeds=row.embeds[None], use_cache=False, **kwargs).logits[0]


def test_a_prompted_sequence_in_the_packed_row_gets_the_logits_it_gets_alone_in_plain_hf(llama):
    model, plain = frozen_llama(llama), frozen_llama(llama, "sdpa")
    torch.manual_seed(0)
    lengths, inputs = [7, 9, 6], [3, 4, 2]
    ids = torch.randint(10, model.config.vocab_size, (sum(lengths),))
    lopa = LopaPrompt(4, model.config.hidden_size, rank=2, head_size=16, init_std=0.5)
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        prompts = lopa.prompts(embeds, lengths, inputs)
        row = prepend_prompts(embeds, ids, lengths, prompts)
        packed = packed_logits(model, row).split(row.sequence_lengths)
        for i, sequence in enumerate(embeds.split(lengths)):
            # prompt tuning as Hugging Face runs it: [Z, x] alone, default positions 0 .. m + L - 1, causal mask
            alone = plain(inputs_embeds=torch.cat([prompts[i], sequence])[None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[i], alone, rtol=1e-5, atol=1e-5)


def test_a_tiny_llama_fed_the_prompted_row_trains_the_prompt_and_leaves_the_base(llama):
    model = frozen_llama(llama)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.manual_seed(0)
    lengths, inputs = [7, 9, 6], [3, 4, 2]
    ids = torch.randint(10, model.config.vocab_size, (sum(lengths),))
    targets = torch.cat([torch.cat([s[1:], torch.tensor([IGNORE_INDEX])]) for s in ids.split(lengths)])
    for start, prompt_rows in zip(torch.tensor([0, *lengths[:-1]]).cumsum(0).tolist(), inputs):
        targets[start:start + prompt_rows - 1] = IGNORE_INDEX  # the answers only are targets
    lopa = LopaPrompt(4, model.config.hidden_size, rank=2, head_size=16, init_std=0.5)
    optimizer = torch.optim.AdamW(lopa.parameters(), lr=1e-1, weight_decay=0.0)
    embeds = model.get_input_embeddings()(ids)
    losses = []
    for _ in range(8):
        row = prepend_prompts(embeds, targets, lengths, lopa.prompts(embeds, lengths, inputs))
        loss = F.cross_entropy(packed_logits(model, row), row.targets, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses  # measured: 5.87 -> 5.68 in 8 steps
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lopa.parameters())  # Z_S and both heads
    assert all(p.grad is None for p in model.parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, base[name]), name
