"""QLoRA (nf4) bases take the kernels' one-node multi-LoRA layer as bf16 bases do (issue 16): a bitsandbytes
Linear4bit's weight is dequantized on demand for the forward GEMM and again for dX, never saved for the backward, and
the node's outputs and gradients are the unfused path's (bitsandbytes' layer, then `lora_delta` into its output).

On the CPU through Triton's interpreter (bitsandbytes 0.50 runs 4-bit there), fp32 compute. Tolerance: both paths read
the same dequantized weight values (bitsandbytes' own forward dequantizes into the compute dtype and runs F.linear;
the node calls `dequantize_4bit` and casts: the same values) and the same LoRA kernels, so what differs is only the
order of fp32 additions (base GEMM + delta in one addmm, the base dX and the LoRA dX summed in one tensor instead of by
autograd): a relative error of a few fp32 ulps, far below 1e-5, where a wrong or missing term is O(1).
"""

from __future__ import annotations

import pytest
import torch
from helpers_models import build_tiny_model, single_torch_thread, write_jsonl  # noqa: F401 (fixture, autouse)
from helpers_triton import interpreted

from lorafleet import kernels
from lorafleet.executor import multilora
from lorafleet.executor.adapters import build_adapter
from lorafleet.executor.cohort import Cohort
from lorafleet.executor.model import load_base
from lorafleet.executor.multilora import Dequantized4bit, MultiLoraLinear, RowRouting, shared_input_projections
from lorafleet.scheduler.spec import AdapterSpec, parse_spec

triton_lora = pytest.importorskip("lorafleet.kernels.triton_lora")
from lorafleet.kernels import cross_entropy, elementwise  # noqa: E402 (the cohort test runs the decoder's kernels)

REL_TOL = 1e-5
N_ROWS = 40  # no projection of the tiny model has 40 outputs: a saved [40, 64] tensor is x, never a weight
JOBS = {"a": (4, 8, 1), "b": (8, 8, 2), "c": (2, 16, 3)}  # job -> (rank, lora_alpha, seed): scales 2, 1, 8
SEGMENTS = {"a": (0, 12), "b": (15, 31), "c": (31, 38)}  # rows 12..15 and 38..40 belong to no job


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernels():
    with interpreted(triton_lora, elementwise, cross_entropy, LORAFLEET_TRITON="1"):
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture
def nf4_layer0(model_dir):
    """Layer 0 of the tiny Llama loaded in nf4 (fp32 compute on the CPU)."""
    model, _ = load_base(model_dir, quantization="nf4")
    layer = model.model.layers[0]
    assert type(layer.mlp.up_proj).__name__ == "Linear4bit"
    return layer


def wrap(bases: dict[str, torch.nn.Module], dropout: float = 0.0) -> list[MultiLoraLinear]:
    """Multi-adapter layers over `bases` serving every job of JOBS (B drawn off its zero init)."""
    routing = RowRouting()
    routing.segments = dict(SEGMENTS)
    routing.dropout_seeds = torch.tensor([11, 12, 13])
    layers = [MultiLoraLinear(base, name, routing) for name, base in bases.items()]
    for job, (rank, alpha, seed) in JOBS.items():
        spec = AdapterSpec(r=rank, lora_alpha=alpha, lora_dropout=dropout)
        adapter = build_adapter(spec, {layer.name: (layer.in_features, layer.out_features) for layer in layers}, seed)
        draw = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for b in adapter.lora_B:
                b.copy_(torch.randn(b.shape, generator=draw))
        for layer in layers:
            layer.adapters[job] = adapter
    return layers


def unfused(layers: list[MultiLoraLinear], x: torch.Tensor) -> list[torch.Tensor]:
    """The path nf4 bases took before: bitsandbytes' layer, then each layer's deltas added into its output."""
    outputs = []
    for layer in layers:
        jobs = list(SEGMENTS)
        adapters = [layer.adapters[job] for job in jobs]
        lora_a, lora_b = layer._factors(adapters)
        y = layer.base(x)
        kernels.lora_delta(x, list(SEGMENTS.values()), lora_a, lora_b, layer._scales(adapters), out=y,
                           dropout=layer._dropout(jobs, adapters))
        outputs.append(y)
    return outputs


def outputs_and_gradients(run, layers: list[MultiLoraLinear], x: torch.Tensor) -> list[torch.Tensor]:
    """[each output, dX, every A and B gradient] for a fixed random output gradient."""
    x = x.clone().requires_grad_()
    outputs = run(layers, x)
    adapters = list(layers[0].adapters.values())
    leaves = [x, *[p for adapter in adapters for p in adapter.parameters()]]
    draw = torch.Generator().manual_seed(5)
    grads_out = [torch.randn(y.shape, generator=draw) for y in outputs]
    return [*[y.detach() for y in outputs], *torch.autograd.grad(outputs, leaves, grads_out)]


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.fixture
def fused_weights(monkeypatch) -> list:
    """The weights every one-node layer call received (the entry points are looked up on `kernels` at each call)."""
    seen = []
    for name in ("lora_linear_triton", "lora_linear_multi_triton"):
        real = getattr(kernels, name)
        many = name.endswith("multi_triton")
        monkeypatch.setattr(kernels, name, lambda x, w, *args, _real=real, _many=many, **kw:
                            seen.extend(w if _many else [w]) or _real(x, w, *args, **kw))
    return seen


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_an_nf4_projection_on_the_fused_node_gives_the_unfused_outputs_and_gradients(nf4_layer0, fused_weights,
                                                                                       dropout):
    layers = wrap({"up_proj": nf4_layer0.mlp.up_proj}, dropout)
    x = torch.randn(N_ROWS, 64, generator=torch.Generator().manual_seed(1))
    got = outputs_and_gradients(lambda ls, x: [ls[0](x)], layers, x)
    assert [type(w) for w in fused_weights] == [Dequantized4bit]
    want = outputs_and_gradients(unfused, layers, x)
    assert len(got) == len(want) == 1 + 1 + 2 * len(JOBS)
    for i, (g, w) in enumerate(zip(got, want)):
        assert rel_error(g, w) < REL_TOL, (i, rel_error(g, w))


def test_nf4_qkv_and_gate_up_groups_on_one_node_give_the_unfused_outputs_and_gradients(nf4_layer0, fused_weights):
    attention, mlp = nf4_layer0.self_attn, nf4_layer0.mlp
    groups = [{"q_proj": attention.q_proj, "k_proj": attention.k_proj, "v_proj": attention.v_proj},
              {"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj}]
    for bases in groups:
        fused_weights.clear()
        layers = wrap(bases)
        x = torch.randn(N_ROWS, 64, generator=torch.Generator().manual_seed(2))
        got = outputs_and_gradients(shared_input_projections, layers, x)
        assert [type(w) for w in fused_weights] == [Dequantized4bit] * len(bases), "one node for the whole group"
        want = outputs_and_gradients(unfused, layers, x)
        assert len(got) == len(want) == len(bases) + 1 + 2 * len(JOBS) * len(bases)  # y_p, dX, each A_p, B_p
        for i, (g, w) in enumerate(zip(got, want)):
            assert rel_error(g, w) < REL_TOL, (list(bases), i, rel_error(g, w))


def saved_shapes(run) -> list[tuple[int, ...]]:
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = run()
    sum(y.sum() for y in outputs).backward()  # the backward dequantizes again: it needs nothing saved
    return shapes


def test_the_fused_node_saves_no_dequantized_nf4_weight_for_the_backward(nf4_layer0):
    attention = nf4_layer0.self_attn
    layers = wrap({"q_proj": attention.q_proj, "k_proj": attention.k_proj, "v_proj": attention.v_proj})
    weight_shapes = {(layer.out_features, layer.in_features) for layer in layers}
    x = torch.randn(N_ROWS, 64, requires_grad=True)
    shapes = saved_shapes(lambda: shared_input_projections(layers, x))
    assert (N_ROWS, 64) in shapes, "x is saved: the hook sees what the node saves"
    assert not weight_shapes & set(shapes)
    # the check can see a weight: the same node over plain (bf16-style) weights saves them
    plain = wrap({layer.name: torch.nn.Linear(64, layer.out_features, bias=False).requires_grad_(False)
                  for layer in layers})
    assert weight_shapes <= set(saved_shapes(lambda: shared_input_projections(plain, x)))


def test_under_no_grad_an_nf4_base_keeps_bitsandbytes_own_inference_kernels(nf4_layer0, fused_weights):
    layers = wrap({"up_proj": nf4_layer0.mlp.up_proj})
    with torch.no_grad():
        y = layers[0](torch.randn(N_ROWS, 64))
    assert y.shape == (N_ROWS, 128)
    assert fused_weights == []


def test_an_int8_base_keeps_its_own_layer_with_the_deltas_added_into_its_output(model_dir):
    model, _ = load_base(model_dir, quantization="int8")
    base = model.model.layers[0].mlp.up_proj
    assert type(base).__name__ == "Linear8bitLt"
    assert multilora.fused_base_weight(base, torch.float32) is None


def train_nf4_cohort(model_dir, tmp_path, steps: int, fp32_cpu_kernels: bool = False) -> list[dict[str, float]]:
    cohort = Cohort(model_dir, quantization="nf4")
    if fp32_cpu_kernels:
        # On the CPU bitsandbytes' own layer, given an input that needs no gradient (layer 0's: the embeddings are
        # frozen), repacks its weight for an AVX512-BF16 kernel that rounds through bf16 (~4e-3 off fp32 here); a GPU
        # has no such kernel at these sizes. Off, so that the unfused run computes in fp32 throughout, as the node does.
        for module in cohort.model.modules():
            if type(module).__name__ == "Linear4bit":
                module.support_avx512bf16_for_cpu = False
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for seed, (job, (rank, alpha)) in enumerate({"x": (4, 8), "y": (8, 32)}.items()):
        spec = parse_spec({"base_model": str(model_dir), "dataset": "d", "quantization": "nf4",
                           "adapter": {"r": rank, "lora_alpha": alpha, "target_modules": every},
                           "hyperparameters": {"batch_size": 2, "max_seq_len": 32, "learning_rate": 1e-2,
                                               "max_steps": steps, "seed": seed}})
        # short rows: the decoder's kernels run through Triton's interpreter
        rows = [{"text": f"{job} {i} the quick brown fox"} for i in range(4)]
        cohort.add_job(job, spec, write_jsonl(tmp_path / f"{job}.jsonl", rows))
    return [{job: result.loss for job, result in cohort.step().items()} for _ in range(steps)]


def test_an_nf4_cohort_on_the_fused_node_trains_with_the_unfused_paths_losses(model_dir, tmp_path, fused_weights,
                                                                               monkeypatch):
    got = train_nf4_cohort(model_dir, tmp_path, steps=2)
    n_fused = len(fused_weights)
    assert n_fused and all(type(w) is Dequantized4bit for w in fused_weights)
    monkeypatch.setattr(multilora, "_is_linear4bit", lambda module: False)  # the path before: bnb's layer + delta
    want = train_nf4_cohort(model_dir, tmp_path, steps=2, fp32_cpu_kernels=True)
    assert len(fused_weights) == n_fused, "the unfused run took no one-node layer"
    assert all(loss is not None for step in want for loss in step.values())
    assert got == [pytest.approx(step, rel=1e-5) for step in want]
    assert want[0] != pytest.approx(want[-1], rel=1e-3), "the jobs trained: their losses moved"
