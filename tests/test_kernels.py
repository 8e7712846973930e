"""Triton multi-LoRA kernels under TRITON_INTERPRET=1 (CPU) against a float64 reference, plus dispatch and input checks.

Triton decides at decoration time whether a @triton.jit function is interpreted, reading TRITON_INTERPRET then; the
`interpreted_kernels` fixture sets it and re-imports the kernel module if it was compiled for a GPU earlier in this
process, and puts things back afterwards.
"""

from __future__ import annotations

import pytest
import torch

from helpers_triton import interpreted
from lorafleet import kernels
from lorafleet.kernels import check_lora_inputs, lora_delta, lora_delta_reference

triton_lora = pytest.importorskip("lorafleet.kernels.triton_lora")
from lorafleet.kernels import cross_entropy, elementwise  # noqa: E402 (the cohort tests run the decoder's and loss's kernels too)
from lorafleet.kernels.segmented import lora_delta_multi_triton, lora_delta_triton  # noqa: E402

REL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernels():
    with interpreted(triton_lora, elementwise, cross_entropy):
        yield


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def make_case(n_rows, d_in, d_out, ranks, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator).to(dtype).requires_grad_()
    x = randn(n_rows, d_in)
    lora_a = [randn(r, d_in) for r in ranks]
    lora_b = [randn(d_out, r) for r in ranks]
    scales = [0.5 + j for j in range(len(ranks))]
    return x, lora_a, lora_b, scales


def float64_reference(x, segments, lora_a, lora_b, scales, grad):
    leaves = [t.detach().double().requires_grad_() for t in [x, *lora_a, *lora_b]]
    n = len(lora_a)
    y = lora_delta_reference(leaves[0], segments, leaves[1:n + 1], leaves[n + 1:], scales)
    return [y, *torch.autograd.grad(y, leaves, grad.double())]


def assert_matches_reference(fn, x, segments, lora_a, lora_b, scales, dtype):
    y = fn(x, segments, lora_a, lora_b, scales)
    assert y.dtype == dtype and y.shape == (x.shape[0], lora_b[0].shape[0])
    grad = torch.randn(y.shape).to(dtype)
    got = [y, *torch.autograd.grad(y, [x, *lora_a, *lora_b], grad)]
    want = float64_reference(x, segments, lora_a, lora_b, scales, grad)
    names = ["y", "dx", *[f"dA{j}" for j in range(len(lora_a))], *[f"dB{j}" for j in range(len(lora_b))]]
    for name, g, w in zip(names, got, want):
        if w.norm() == 0:  # an empty segment: its adapter gets exactly zero gradient
            assert torch.count_nonzero(g) == 0, name
        else:
            assert rel_error(g, w) < REL_TOL[dtype], (name, rel_error(g, w))


# Ragged segments with a gap before the first, an empty one, a one-row one, a gap in the middle and rows left at the
# end; ranks 1..16 per adapter, listed out of row order.
RAGGED_SEGMENTS = [(40, 70), (3, 20), (20, 20), (21, 22), (22, 37)]
RAGGED_RANKS = [4, 1, 8, 3, 16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_and_gradients_match_float64(dtype):
    x, lora_a, lora_b, scales = make_case(75, 48, 40, RAGGED_RANKS, dtype, seed=1)
    assert_matches_reference(lora_delta_triton, x, RAGGED_SEGMENTS, lora_a, lora_b, scales, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_128_and_rank_1(dtype):
    x, lora_a, lora_b, scales = make_case(50, 32, 24, [128, 1], dtype, seed=2)
    assert_matches_reference(lora_delta_triton, x, [(0, 33), (33, 50)], lora_a, lora_b, scales, dtype)


def test_rows_outside_segments_are_zero_even_in_reused_memory():
    x, lora_a, lora_b, scales = make_case(64, 32, 32, [8], torch.float32, seed=3)
    for _ in range(3):  # fresh allocations may reuse memory holding earlier results
        y = lora_delta_triton(x, [(10, 20)], lora_a, lora_b, scales)
        assert torch.count_nonzero(y[:10]) == 0 and torch.count_nonzero(y[20:]) == 0
        assert torch.count_nonzero(y[10:20]) == y[10:20].numel()


def test_accumulates_into_given_output_in_place():
    x, lora_a, lora_b, scales = make_case(40, 32, 24, [4, 8], torch.float32, seed=4)
    segments = [(0, 15), (15, 40)]
    base_weight = torch.randn(24, 32, requires_grad=True)
    base = x @ base_weight.t()
    expected = base.detach() + lora_delta_reference(x, segments, lora_a, lora_b, scales).detach()
    out = lora_delta_triton(x, segments, lora_a, lora_b, scales, out=base)
    assert out is base
    assert rel_error(out.detach(), expected.double()) < 1e-5
    grad = torch.randn(out.shape)
    got_x, got_w, got_a0 = torch.autograd.grad(out, [x, base_weight, lora_a[0]], grad)

    x2 = x.detach().clone().requires_grad_()
    a0 = lora_a[0].detach().clone().requires_grad_()
    reference = x2 @ base_weight.detach().t() + lora_delta_reference(x2, segments, [a0, lora_a[1]], lora_b, scales)
    want_x, want_a0 = torch.autograd.grad(reference, [x2, a0], grad)
    assert rel_error(got_x, want_x.double()) < 1e-5
    assert rel_error(got_w, (grad.t() @ x.detach()).double()) < 1e-5
    assert rel_error(got_a0, want_a0.double()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_projection_shares_one_shrink_and_matches_separate(dtype):
    # q/k/v-like: one x, three projections with their own output widths and ranks per adapter.
    generator = torch.Generator().manual_seed(5)
    randn = lambda *shape: torch.randn(*shape, generator=generator).to(dtype).requires_grad_()
    x = randn(45, 32)
    segments = [(0, 20), (25, 45)]
    scales = [2.0, 0.5]
    widths, ranks = [32, 16, 8], [[4, 16], [2, 8], [1, 1]]
    lora_as = [[randn(r, 32) for r in rs] for rs in ranks]
    lora_bs = [[randn(w, r) for r in rs] for w, rs in zip(widths, ranks)]
    deltas = lora_delta_multi_triton(x, segments, lora_as, lora_bs, scales)
    grads_out = [torch.randn(d.shape).to(dtype) for d in deltas]
    leaves = [x, *[t for group in lora_as + lora_bs for t in group]]
    got = torch.autograd.grad(deltas, leaves, grads_out)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, rest = leaves64[0], leaves64[1:]
    as64, bs64 = [rest[0:2], rest[2:4], rest[4:6]], [rest[6:8], rest[8:10], rest[10:12]]
    deltas64 = [lora_delta_reference(x64, segments, a, b, scales) for a, b in zip(as64, bs64)]
    want = torch.autograd.grad(deltas64, leaves64, [g.double() for g in grads_out])
    for d, d64 in zip(deltas, deltas64):
        assert rel_error(d, d64) < REL_TOL[dtype]
    for g, w in zip(got, want):
        assert rel_error(g, w) < REL_TOL[dtype]


def test_all_segments_empty_gives_zeros_and_zero_gradients():
    x, lora_a, lora_b, scales = make_case(10, 16, 16, [4, 4], torch.float32, seed=6)
    y = lora_delta_triton(x, [(3, 3), (5, 5)], lora_a, lora_b, scales)
    assert y.shape == (10, 16) and torch.count_nonzero(y) == 0
    grads = torch.autograd.grad(y.sum(), [x, *lora_a])
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_dispatch_uses_triton_only_when_asked_on_cpu(monkeypatch):
    x, lora_a, lora_b, scales = make_case(20, 16, 16, [4], torch.float32, seed=7)
    monkeypatch.delenv("LORAFLEET_TRITON", raising=False)
    assert not kernels.triton_enabled(x)
    monkeypatch.setenv("LORAFLEET_TRITON", "1")
    assert kernels.triton_enabled(x)
    calls = []
    monkeypatch.setattr(
        kernels, "lora_delta_triton", lambda *args, **kw: calls.append(args) or lora_delta_triton(*args, **kw)
    )
    y = lora_delta(x, [(2, 18)], lora_a, lora_b, scales)
    assert len(calls) == 1
    assert rel_error(y.detach(), lora_delta_reference(x, [(2, 18)], lora_a, lora_b, scales).detach().double()) < 1e-5


@pytest.mark.parametrize(
    "segments, ranks, b_rows, match",
    [
        ([(0, 10), (5, 15)], [4, 4], 16, "overlap"),
        ([(0, 30)], [4], 16, "not a row range"),
        ([(0, 10)], [4, 4], 16, "one A, B and scale per segment"),
        ([(0, 10), (10, 20)], [4, 4], 8, r"lora_b\[1\] must be"),
    ],
)
def test_bad_input_raises_clear_error(segments, ranks, b_rows, match):
    x, lora_a, lora_b, scales = make_case(20, 16, 16, ranks, torch.float32, seed=8)
    if b_rows != 16:
        lora_b[1] = torch.randn(b_rows, ranks[1])
    with pytest.raises(ValueError, match=match):
        check_lora_inputs(x, segments, lora_a, lora_b, scales[: len(segments)] if len(ranks) == 1 else scales)
    with pytest.raises(ValueError, match=match):
        lora_delta(x, segments, lora_a, lora_b, scales[: len(segments)] if len(ranks) == 1 else scales)


def test_fp32_adapters_with_bf16_activations_get_fp32_gradients():
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(30, 32, generator=generator).to(torch.bfloat16).requires_grad_()
    lora_a = [torch.randn(4, 32, generator=generator, requires_grad=True) for _ in range(2)]
    lora_b = [torch.randn(16, 4, generator=generator, requires_grad=True) for _ in range(2)]
    segments, scales = [(0, 12), (12, 30)], [1.0, 0.5]
    y = lora_delta_triton(x, segments, lora_a, lora_b, scales)
    assert y.dtype == torch.bfloat16
    grad = torch.randn(y.shape).to(torch.bfloat16)
    got = torch.autograd.grad(y, [x, *lora_a, *lora_b], grad)
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[1:])
    # The reference on the same bf16-rounded adapters, in float64.
    rounded = [t.detach().to(torch.bfloat16) for t in [*lora_a, *lora_b]]
    want = float64_reference(x, segments, rounded[:2], rounded[2:], scales, grad)
    for g, w in zip(got, want[1:]):
        assert rel_error(g, w) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("weight_requires_grad", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])  # without a bias the delta is written first and the GEMM adds in
@pytest.mark.parametrize("segments", [
    [(30, 50), (0, 10), (12, 29)],  # out of order, rows 10-11 and 29 belong to no adapter
    [(20, 50), (0, 20)],  # every row covered: outputs start as uninitialised memory the expand overwrites
])
def test_lora_linear_is_base_plus_delta_with_all_gradients(weight_requires_grad, with_bias, segments):
    x, lora_a, lora_b, scales = make_case(50, 32, 24, [4, 16, 2][:len(segments)], torch.float32, seed=10)
    n = len(segments)
    weight = torch.randn(24, 32).requires_grad_(weight_requires_grad)
    bias = torch.randn(24, requires_grad=True) if with_bias else None
    for _ in range(2):  # the second call may reuse memory holding the first one's results
        y = kernels.lora_linear_triton(x, weight, bias, segments, lora_a, lora_b, scales)
        grad = torch.randn(y.shape)
        leaves = [x, *lora_a, *lora_b] + ([bias] if with_bias else []) + ([weight] if weight_requires_grad else [])
        got = [y, *torch.autograd.grad(y, leaves, grad)]

        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        weight64 = leaves64[-1] if weight_requires_grad else weight.double()
        bias64 = leaves64[1 + 2 * n] if with_bias else None
        x64 = leaves64[0]
        y64 = torch.nn.functional.linear(x64, weight64, bias64) + lora_delta_reference(
            x64, segments, leaves64[1:1 + n], leaves64[1 + n:1 + 2 * n], scales)
        want = [y64, *torch.autograd.grad(y64, leaves64, grad.double())]
        for i, (g, w) in enumerate(zip(got, want)):
            assert rel_error(g, w) < 1e-5, (i, rel_error(g, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_multi_is_each_layer_plus_its_delta(dtype):
    """q/k/v-like layers of different widths (one without bias, one with a trainable weight) over shared x."""
    generator = torch.Generator().manual_seed(12)
    randn = lambda *shape: torch.randn(*shape, generator=generator).to(dtype)  # noqa: E731
    segments = [(30, 50), (0, 10), (12, 29)]
    widths, ranks = [24, 8, 16], [4, 16, 2]
    x = randn(50, 32).requires_grad_()
    weights = [randn(width, 32).requires_grad_(p == 2) for p, width in enumerate(widths)]
    biases = [randn(24).requires_grad_(), None, randn(16).requires_grad_()]
    lora_as = [[randn(r, 32).requires_grad_() for r in ranks] for _ in widths]
    lora_bs = [[randn(width, r).requires_grad_() for r in ranks] for width in widths]
    scales = [0.5, 2.0, 1.0]
    leaves = [x, weights[2], biases[0], biases[2], *[t for ts in lora_as + lora_bs for t in ts]]

    outputs = kernels.lora_linear_multi_triton(x, weights, biases, segments, lora_as, lora_bs, scales)
    grads_out = [randn(*y.shape) for y in outputs]
    got = [*outputs, *torch.autograd.grad(outputs, leaves, grads_out)]

    doubles = {id(t): t.detach().double().requires_grad_(t.requires_grad) for t in [*leaves, *weights]}
    d = lambda t: None if t is None else doubles[id(t)]  # noqa: E731
    want_outputs = [torch.nn.functional.linear(d(x), d(w), d(b)) + lora_delta_reference(
        d(x), segments, [d(a) for a in lora_a], [d(b_) for b_ in lora_b], scales)
        for w, b, lora_a, lora_b in zip(weights, biases, lora_as, lora_bs)]
    want = [*want_outputs, *torch.autograd.grad(want_outputs, [d(t) for t in leaves], [g.double() for g in grads_out])]
    assert [g.shape for g in got] == [w.shape for w in want]
    for i, (g, w) in enumerate(zip(got, want)):
        assert rel_error(g, w) < REL_TOL[dtype], (i, rel_error(g, w))


def test_frozen_adapters_give_only_the_input_gradient():
    x, lora_a, lora_b, scales = make_case(40, 32, 24, [8, 8], torch.float32, seed=11)
    frozen_a = [a.detach() for a in lora_a]
    frozen_b = [b.detach() for b in lora_b]
    segments = [(0, 25), (25, 40)]
    y = lora_delta_triton(x, segments, frozen_a, frozen_b, scales)
    grad = torch.randn(y.shape)
    (got,) = torch.autograd.grad(y, [x], grad)
    want = float64_reference(x, segments, frozen_a, frozen_b, scales, grad)[1]
    assert rel_error(got, want) < 1e-5


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_multi_lora_layer_on_the_triton_path_matches_the_reference_path(monkeypatch, dropout):
    """The engine's layer on the kernels vs the reference path, the same dropout masks on both."""
    from lorafleet.executor.adapters import build_adapter
    from lorafleet.executor.multilora import MultiLoraLinear, RowRouting
    from lorafleet.scheduler.spec import AdapterSpec

    torch.manual_seed(0)
    base = torch.nn.Linear(32, 24).requires_grad_(False)
    routing = RowRouting()
    layer = MultiLoraLinear(base, "proj", routing)
    for job, (r, seed) in {"a": (4, 1), "b": (8, 2)}.items():
        adapter = build_adapter(AdapterSpec(r=r, lora_dropout=dropout), {"proj": (32, 24)}, seed)
        torch.nn.init.normal_(adapter.lora_B[0])
        layer.adapters[job] = adapter
    routing.segments = {"a": (0, 5), "b": (7, 19)}
    routing.dropout_seeds = torch.tensor([11, 12])
    x = torch.randn(1, 20, 32)

    def run(triton: bool):
        monkeypatch.setenv("LORAFLEET_TRITON", "1" if triton else "0")
        for adapter in layer.adapters.values():
            adapter.zero_grad()
        inputs = x.clone().requires_grad_()
        y = layer(inputs)
        y.backward(torch.ones_like(y))
        grads = [p.grad.clone() for adapter in layer.adapters.values() for p in adapter.parameters()]
        return y.detach(), inputs.grad, grads

    want, got = run(False), run(True)
    for w, g in zip([want[0], want[1], *want[2]], [got[0], got[1], *got[2]]):
        assert rel_error(g, w.double()) < 1e-5


def test_adding_into_a_view_of_a_tensor_that_needs_grad(monkeypatch):
    """autograd replays an in-place change of a view through the op's first input; lora_delta must still be right."""
    monkeypatch.setenv("LORAFLEET_TRITON", "1")
    x, lora_a, lora_b, scales = make_case(12, 16, 8, [4], torch.float32, seed=3)
    weight = torch.randn(8, 16)
    base = (x @ weight.t()).view(3, 4, 8)
    out = lora_delta(x, [(2, 10)], lora_a, lora_b, scales, out=base.view(12, 8))
    out.sum().backward()
    want_x = x.detach().double().requires_grad_()
    expected = want_x @ weight.double().t() + lora_delta_reference(
        want_x, [(2, 10)], [a.detach().double() for a in lora_a], [b.detach().double() for b in lora_b], scales)
    expected.sum().backward()
    assert rel_error(out.detach(), expected.detach()) < 1e-5
    assert rel_error(x.grad, want_x.grad) < 1e-5


def test_a_checkpoint_holds_only_its_own_jobs_pending_gradients(monkeypatch, tmp_path):
    """On the kernel path all jobs' A gradients are views of one buffer; a checkpoint must not carry the others'."""
    from helpers_models import build_tiny_model, write_jsonl

    from torch.utils._pytree import tree_leaves

    from lorafleet.executor.checkpoint import TRAINING_STATE, _Slot, read_training_state
    from lorafleet.executor.cohort import Cohort
    from lorafleet.scheduler.spec import parse_spec

    monkeypatch.setenv("LORAFLEET_TRITON", "1")
    model = build_tiny_model(tmp_path / "model", "llama")
    cohort = Cohort(model)
    for job, seed in (("x", 1), ("y", 2)):
        spec = parse_spec({"base_model": str(model), "dataset": "d", "adapter": {"r": 4, "target_modules": ["q_proj"]},
                           "hyperparameters": {"batch_size": 1, "max_seq_len": 64, "gradient_accumulation_steps": 4,
                                               "max_steps": 1, "seed": seed}})
        rows = [{"text": f"{job} {i} the quick brown fox"} for i in range(4)]  # short: the kernels are interpreted
        cohort.add_job(job, spec, write_jsonl(tmp_path / f"{job}.jsonl", rows))
    cohort.step()  # mid-accumulation: gradients are pending
    directory = cohort.checkpoint("x", tmp_path / "ckpt")
    _, state = read_training_state(directory)
    assert any(g is not None for g in state["pending_grads"])
    tensors = [leaf for leaf in tree_leaves(state) if isinstance(leaf, torch.Tensor)]
    with torch.serialization.safe_globals([_Slot]):
        saved = torch.load(directory / TRAINING_STATE, weights_only=True)
    saved_tensors = [leaf for leaf in tree_leaves(saved) if isinstance(leaf, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved_tensors}
    # the file's storages hold the job's own tensors and nothing more (the shared buffer would add y's gradients)
    assert sum(storages.values()) == sum(t.numel() * t.element_size() for t in tensors)


def test_cohort_on_the_kernel_path_fuses_shared_input_projections_and_matches_the_reference(monkeypatch, tmp_path):
    """Two steps of a cohort with Triton (q/k/v and gate/up as lora_linear_multi nodes where every job targets the
    group) against the PyTorch reference path."""
    from helpers_models import build_tiny_model, write_jsonl

    from lorafleet.executor.cohort import Cohort
    from lorafleet.kernels import segmented
    from lorafleet.scheduler.spec import parse_spec

    model = build_tiny_model(tmp_path / "model", "llama")
    targets = {"all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
               "qv": ["q_proj", "v_proj"]}  # "qv" leaves q/k/v unfused (k lacks it); gate/up still fuse for "all"
    fused_widths = []
    original = segmented.lora_linear_multi_triton

    def counting(x, weights, *args):
        fused_widths.append([w.shape[0] for w in weights])
        return original(x, weights, *args)

    monkeypatch.setattr(kernels, "lora_linear_multi_triton", counting)
    results = {}
    for triton in (False, True):
        monkeypatch.setenv("LORAFLEET_TRITON", "1" if triton else "0")
        cohort = Cohort(model)
        for seed, (job, modules) in enumerate(targets.items()):
            spec = parse_spec({"base_model": str(model), "dataset": "d",
                               "adapter": {"r": 4, "lora_alpha": 8, "target_modules": modules},
                               "hyperparameters": {"batch_size": 2, "max_seq_len": 32, "learning_rate": 1e-2,
                                                   "max_steps": 2, "seed": seed}})
            # short rows: the decoder's kernels run through Triton's interpreter
            rows = [{"text": f"{job} {i} the quick brown fox"} for i in range(4)]
            cohort.add_job(job, spec, write_jsonl(tmp_path / f"{job}.jsonl", rows))
        losses = [{job: r.loss for job, r in cohort.step().items()} for _ in range(2)]
        results[triton] = losses, {job: cohort.jobs[job].adapter.lora_weights() for job in targets}
    (want_losses, want), (got_losses, got) = results[False], results[True]
    assert fused_widths and all(widths == [128, 128] for widths in fused_widths)  # gate/up only, never q/k/v here
    assert all(loss is not None for step in want_losses for loss in step.values())
    assert got_losses == [pytest.approx(step, rel=1e-5) for step in want_losses]
    for job in targets:
        for name, pair in want[job].items():
            for g, w in zip(got[job][name], pair):
                # Adam divides by the gradients' own size: rounding in the small second-step gradients shows as ~1e-4
                assert rel_error(g, w.double()) < 1e-3, (job, name)


def test_dropout_masks_keep_the_right_share_independently_per_stream_and_seed():
    p = 0.3
    a = kernels.dropout_keep_reference(5 + 11, 200, 64, p)
    b = kernels.dropout_keep_reference(5 + 12, 200, 64, p)  # the next stream of the same seed
    c = kernels.dropout_keep_reference(6 + 11, 200, 64, p)  # another seed
    for mask in (a, b, c):
        assert abs(mask.float().mean().item() - (1 - p)) < 0.01
    for other in (b, c):  # independent masks agree on (1-p)^2 + p^2 of the elements
        assert abs((a == other).float().mean().item() - ((1 - p) ** 2 + p ** 2)) < 0.01
    assert torch.equal(a, kernels.dropout_keep_reference(16, 200, 64, p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_out", [False, True])  # lora_linear (plain bases) or the delta into `out` (bitsandbytes)
def test_dropout_in_the_kernels_matches_the_float64_reference(dtype, with_out):
    segments = [(40, 70), (3, 20), (20, 20), (21, 22), (22, 37)]
    x, lora_a, lora_b, scales = make_case(75, 48, 40, [4, 1, 8, 3, 16], dtype, seed=21)
    weight = torch.randn(40, 48).to(dtype)
    dropout = kernels.LoraDropout(probs=(0.25, 0.0, 0.5, 0.1, 0.6),
                                  seeds=torch.tensor([7, 8, 9, -3, 2**40], dtype=torch.int64), stream=1234)
    if with_out:
        y = lora_delta_triton(x, segments, lora_a, lora_b, scales, out=x @ weight.t(), dropout=dropout)
    else:
        y = kernels.lora_linear_triton(x, weight, None, segments, lora_a, lora_b, scales, dropout=dropout)
    grad = torch.randn(y.shape).to(dtype)
    leaves = [x, *lora_a, *lora_b]
    got = [y, *torch.autograd.grad(y, leaves, grad)]

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64 = leaves64[0]
    y64 = x64 @ weight.double().t() + lora_delta_reference(
        kernels.dropout_reference(x64, segments, dropout), segments, leaves64[1:6], leaves64[6:], scales)
    want = [y64, *torch.autograd.grad(y64, leaves64, grad.double())]
    for i, (g, w) in enumerate(zip(got, want)):
        if w.norm() == 0:
            assert torch.count_nonzero(g) == 0, i
        else:
            assert rel_error(g, w) < REL_TOL[dtype], (i, rel_error(g, w))
    # and the mask differs from no dropout at all
    plain = kernels.lora_linear_triton(x, weight, None, segments, lora_a, lora_b, scales)
    assert rel_error(plain.detach(), y.detach().double()) > 0.05


def test_a_jobs_dropout_mask_does_not_depend_on_where_its_rows_are_packed():
    x, lora_a, lora_b, scales = make_case(40, 32, 24, [8], torch.float32, seed=22)
    seeds = torch.tensor([99], dtype=torch.int64)
    dropout = kernels.LoraDropout(probs=(0.4,), seeds=seeds, stream=5)
    rows = x.detach()[:10]
    placed = torch.cat([torch.zeros(20, 32), rows, torch.zeros(10, 32)])
    at_start = lora_delta_triton(rows, [(0, 10)], lora_a, lora_b, scales, dropout=dropout)
    at_20 = lora_delta_triton(placed, [(20, 30)], lora_a, lora_b, scales, dropout=dropout)
    assert torch.allclose(at_start, at_20[20:30], rtol=1e-5, atol=1e-6)


def test_dropout_refuses_what_it_cannot_do():
    x, lora_a, lora_b, scales = make_case(20, 16, 16, [4, 4], torch.float32, seed=23)
    dropout = kernels.LoraDropout(probs=(0.1, 0.1), seeds=torch.tensor([1, 2]), stream=0)
    with pytest.raises(ValueError, match="one mask per projection"):
        lora_delta_multi_triton(x, [(0, 10), (10, 20)], [lora_a, lora_a], [lora_b, lora_b], scales, dropout=dropout)
    with pytest.raises(ValueError, match="one probability and one seed per segment"):
        lora_delta_triton(x, [(0, 10), (10, 20)], lora_a, lora_b, scales,
                          dropout=kernels.LoraDropout(probs=(0.1,), seeds=torch.tensor([1]), stream=0))
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        lora_delta_triton(x, [(0, 10), (10, 20)], lora_a, lora_b, scales,
                          dropout=kernels.LoraDropout(probs=(0.1, 1.0), seeds=torch.tensor([1, 2]), stream=0))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_jobs_beside_lora_jobs_on_the_triton_path_match_the_reference_path(monkeypatch, dropout):
    """A DoRA job's rows run in PyTorch while the LoRA jobs' run in the kernels (and q/k/v-style shared projections
    fall back to one node per layer): outputs and every gradient are the reference path's."""
    from lorafleet.executor.adapters import build_adapter
    from lorafleet.executor.multilora import MultiLoraLinear, RowRouting, shared_input_projections
    from lorafleet.scheduler.spec import AdapterSpec

    torch.manual_seed(0)
    routing = RowRouting()
    layers = [MultiLoraLinear(torch.nn.Linear(32, d_out).requires_grad_(False), f"proj{i}", routing)
              for i, d_out in enumerate((24, 16))]
    for job, (r, dora, seed) in {"a": (4, False, 1), "d": (8, True, 2), "e": (2, True, 3)}.items():
        spec = AdapterSpec(r=r, lora_dropout=dropout, use_dora=dora)
        adapter = build_adapter(spec, {layer.name: (32, layer.out_features) for layer in layers}, seed,
                                {layer.name: layer.base.weight for layer in layers})
        for i, layer in enumerate(layers):
            torch.nn.init.normal_(adapter.lora_B[i])
            layer.adapters[job] = adapter
    routing.segments = {"a": (0, 5), "d": (7, 19), "e": (19, 23)}
    routing.dropout_seeds = torch.tensor([11, 12, 13])
    x = torch.randn(1, 24, 32)

    def run(triton: bool):
        monkeypatch.setenv("LORAFLEET_TRITON", "1" if triton else "0")
        adapters = layers[0].adapters.values()
        for adapter in adapters:
            adapter.zero_grad()
        inputs = x.clone().requires_grad_()
        outputs = shared_input_projections(layers, inputs)
        sum(y.sum() for y in outputs).backward()
        return [*[y.detach() for y in outputs], inputs.grad, *[p.grad.clone() for a in adapters for p in a.parameters()]]

    want, got = run(False), run(True)
    assert len(want) == 2 + 1 + 2 * 2 + 2 * 3 * 2  # y of both layers, dx, (A, B) of "a", (A, B, m) of "d" and "e"
    for w, g in zip(want, got):
        assert rel_error(g, w.double()) < 1e-5
