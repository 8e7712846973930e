"""The rest of the step: chunked LM-head loss, activation checkpointing, and (on a GPU) varlen flash attention."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from helpers_models import FAMILIES, alpaca_rows, build_tiny_model, single_torch_thread, write_jsonl  # noqa: F401

from lorafleet.executor import loss as loss_module
from lorafleet.executor.cohort import Cohort
from lorafleet.executor.data import IGNORE_INDEX
from lorafleet.executor.loss import chunked_head_loss_applies, token_losses
from lorafleet.executor.model import load_base, packed_attention, packing_kwargs
from lorafleet.scheduler.spec import parse_spec


def random_problem(rows=37, hidden=24, vocab=50, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(rows, hidden, generator=generator, dtype=dtype)
    head = torch.randn(vocab, hidden, generator=generator, dtype=dtype)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::5] = IGNORE_INDEX
    return states, head, targets


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 1000])
def test_chunked_loss_and_gradient_equal_full_logits(monkeypatch, rows_per_chunk):
    monkeypatch.setattr(loss_module, "chunk_rows", lambda vocab: rows_per_chunk)
    states, head, targets = random_problem()
    weights = torch.rand(states.shape[0])  # per-row upstream gradient, as per-job means give

    mine = states.clone().requires_grad_()
    got = token_losses(mine, head, targets)
    (got * weights).sum().backward()

    full = states.clone().requires_grad_()
    want = F.cross_entropy((full @ head.T).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    (want * weights).sum().backward()

    assert got.dtype == torch.float32
    assert ((got - want).abs() <= 1e-6 * want.abs().clamp(min=1)).all()
    assert (got[targets == IGNORE_INDEX] == 0).all()
    assert (mine.grad - full.grad).norm() <= 1e-6 * full.grad.norm()


def test_chunked_loss_refuses_a_trainable_head():
    states, head, targets = random_problem()
    with pytest.raises(ValueError, match="frozen LM head"):
        token_losses(states, head.requires_grad_(), targets)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_plus_chunked_head_equals_model_loss(tmp_path, family, single_torch_thread):
    model, _ = load_base(build_tiny_model(tmp_path, family))
    lengths = [5, 9, 3]
    ids = torch.randint(3, model.config.vocab_size, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    targets = torch.cat([ids[0, 1:], torch.tensor([IGNORE_INDEX])])
    kwargs = packing_kwargs(lengths, "cpu")
    assert chunked_head_loss_applies(model)
    with torch.no_grad():
        want = F.cross_entropy(model(ids, **kwargs).logits[0].float(), targets, reduction="none")
        hidden = model.base_model(ids, **kwargs).last_hidden_state[0]
        got = token_losses(hidden, model.lm_head.weight, targets)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def make_spec(model_dir, seed, dropout):
    return parse_spec(
        {
            "base_model": str(model_dir),
            "dataset": "unused",
            "adapter": {"r": 4, "lora_alpha": 8, "lora_dropout": dropout},
            "hyperparameters": {"batch_size": 2, "learning_rate": 1e-2, "lr_scheduler": "constant", "seed": seed},
        }
    )


CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_trains_identically_with_dropout(tmp_path, every, device, single_torch_thread):
    """Recomputed layers see the same rows and the same per-job dropout masks as the forward drew."""
    model_dir = build_tiny_model(tmp_path / "model", "llama")
    data = [write_jsonl(tmp_path / f"{i}.jsonl", alpaca_rows(6, seed=i)) for i in range(2)]
    trained = {}
    for checkpointing in (0, every):
        cohort = Cohort(model_dir, device=device, activation_checkpointing=checkpointing)
        for i, path in enumerate(data):
            cohort.add_job(f"job-{i}", make_spec(model_dir, seed=i, dropout=0.2 * i), path)
        losses = [{job: r.loss for job, r in cohort.step().items()} for _ in range(3)]
        trained[checkpointing] = losses, {job: cohort.jobs[job].adapter.lora_weights() for job in cohort.jobs}
    (plain_losses, plain), (ckpt_losses, ckpt) = trained[0], trained[every]
    tolerance = 1e-5 if device == "cpu" else 2e-2  # bf16 on the GPU, weight gradients summed by atomics
    assert len(ckpt_losses) == len(plain_losses)
    for got_step, want_step in zip(ckpt_losses, plain_losses):  # one {job: loss} per step
        assert got_step.keys() == want_step.keys()
        for job, want in want_step.items():
            assert got_step[job] == pytest.approx(want, rel=tolerance), (job, got_step, want_step)
    for job in plain:
        for name in plain[job]:
            for got, want in zip(ckpt[job][name], plain[job][name]):
                torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * 1e-1)
    assert any((w[1] != 0).any() for w in plain["job-1"].values())  # B moved: the test compares trained weights


def test_activation_checkpointing_recomputes(tmp_path, single_torch_thread):
    """Backward redoes the forward of the checkpointed layers: of both layers with 1, of one with 2, of none with 0."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpsRun(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))

    model_dir = build_tiny_model(tmp_path / "model", "llama")
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(4))
    ops = {}
    for every in (0, 2, 1):
        cohort = Cohort(model_dir, activation_checkpointing=every)
        cohort.add_job("job", make_spec(model_dir, seed=0, dropout=0.0), data)
        with OpsRun() as seen:
            cohort.step()
        ops[every] = seen.ops
    assert ops[0]["silu"] == 2  # the tiny model has two layers
    assert ops[2]["silu"] == 3 and ops[1]["silu"] == 4
    assert ops[0]["mm"] < ops[2]["mm"] < ops[1]["mm"]


def test_checkpointing_set_again_unwraps_to_the_fused_layer_forward(tmp_path):
    # The benchmark switches a loaded cohort's setting (bench_e2e.set_checkpointing): a layer left unchecked must get
    # back the forward it had under the wrapper (the fused decoder's), not the class's.
    from lorafleet.executor.activations import checkpoint_layers, recomputes
    from lorafleet.executor.model import decoder_layers

    cohort = Cohort(build_tiny_model(tmp_path / "model", "llama"), activation_checkpointing=1)
    layers = decoder_layers(cohort.model)
    assert all(recomputes(layer) for layer in layers)
    checkpoint_layers(layers, cohort.routing, 2)
    assert [recomputes(layer) for layer in layers] == [True, False]
    checkpoint_layers(layers, cohort.routing, 0)
    assert not any(recomputes(layer) for layer in layers)
    assert all(layer.forward.__func__.__name__ == "_layer_forward" for layer in layers)


def test_activation_checkpointing_mode_is_checked(tmp_path):
    with pytest.raises(ValueError, match="activation checkpointing 'yes'"):
        Cohort(build_tiny_model(tmp_path / "model", "llama"), activation_checkpointing="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (32, 8)])
def test_varlen_flash_attention_matches_per_sequence_reference(heads, kv_heads):
    from lorafleet.executor.attention import varlen_supported

    lengths = [512, 1, 37, 300, 2048, 100]
    generator = torch.Generator(device="cuda").manual_seed(0)

    def rand(h):
        return torch.randn(1, h, sum(lengths), 128, device="cuda", dtype=torch.bfloat16, generator=generator)

    query, key, value = rand(heads), rand(kv_heads), rand(kv_heads)
    kwargs = packing_kwargs(lengths, "cuda")
    assert varlen_supported(query, key, 128**-0.5, None)
    grads = []
    for use_varlen in (True, False):
        q, k, v = (t.clone().requires_grad_() for t in (query, key, value))
        if use_varlen:
            out, _ = packed_attention(None, q, k, v, None, scaling=128**-0.5, **kwargs)
        else:  # the per-sequence loop, in fp32
            q32, k32, v32 = (t.float() for t in (q, k, v))
            out, _ = packed_attention(None, q32, k32, v32, None, scaling=128**-0.5, **kwargs)
        assert out.shape == (1, sum(lengths), heads, 128)
        out.float().square().sum().backward()
        grads.append((out.float(), q.grad.float(), k.grad.float(), v.grad.float()))
    for name, got, want in zip(("out", "dq", "dk", "dv"), *grads):
        error = ((got - want).norm() / want.norm()).item()
        assert error < 2e-2, f"{name}: relative error {error:.3g}"


@pytest.mark.parametrize("lengths,bound,dense", [
    ([512, 512, 512], 512, 512),      # equal lengths: a dense batch
    ([512, 512, 512], 1024, None),    # a looser bound (a graph's bucket) cannot prove it
    ([500, 512, 524], 524, None),     # same count and total, unequal lengths
    ([512, 500, 12], 512, None),      # a graph's padding sequence
    ([7], 7, 7),
])
def test_a_row_is_dense_only_when_its_counts_prove_every_length_equal(lengths, bound, dense):
    from lorafleet.executor.attention import dense_length

    assert dense_length(sum(lengths), len(lengths), bound) == dense
    if dense is not None:
        assert set(lengths) == {dense}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 8, 128), (32, 8, 64), (8, 8, 128)])
def test_dense_attention_of_equal_length_rows_matches_the_per_sequence_reference(monkeypatch, heads, kv_heads, dim):
    """The cuDNN path for rows of equal-length sequences: as close to the fp32 loop as the varlen kernel is, and
    really taken (a call that fell back to varlen would pass the closeness check for the wrong reason)."""
    from lorafleet.executor import attention

    lengths = [512] * 6
    generator = torch.Generator(device="cuda").manual_seed(0)
    shapes = {"q": heads, "k": kv_heads, "v": kv_heads}
    query, key, value = (torch.randn(1, h, sum(lengths), dim, device="cuda", dtype=torch.bfloat16,
                                     generator=generator) for h in shapes.values())
    kwargs = packing_kwargs(lengths, "cuda")
    dense_calls = []
    original = attention.dense_causal_attention
    monkeypatch.setattr(attention, "dense_causal_attention",
                        lambda *args: dense_calls.append(1) or original(*args))
    results = {}
    for mode in ("dense", "varlen", "reference"):
        monkeypatch.setattr(attention, "DENSE_WHEN_UNIFORM", mode == "dense")
        q, k, v = (t.clone().requires_grad_() for t in (query, key, value))
        inputs = (q, k, v) if mode != "reference" else (q.float(), k.float(), v.float())
        out, _ = packed_attention(None, *inputs, None, scaling=dim**-0.5, **kwargs)
        out.float().square().sum().backward()
        results[mode] = (out.float(), q.grad.float(), k.grad.float(), v.grad.float())
        if mode == "dense":
            assert dense_calls, "the equal-length row did not take the dense path"
            assert original(q.detach()[0].transpose(0, 1), k.detach()[0].transpose(0, 1),
                            v.detach()[0].transpose(0, 1), 512, dim**-0.5) is not None, "cuDNN refused the call"
    for index, name in enumerate(("out", "dq", "dk", "dv")):
        want = results["reference"][index]
        errors = {mode: ((results[mode][index] - want).norm() / want.norm()).item() for mode in ("dense", "varlen")}
        assert errors["dense"] < max(2 * errors["varlen"], 1e-2), f"{name}: relative errors {errors}"
