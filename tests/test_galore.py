"""GaLore's optimizer (executor/galore.py) against galore-torch's GaLoreAdamW on a tiny model on the CPU, and the
memory it keeps against the memory model's count (scheduler/memory.py)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from helpers_models import single_torch_thread, tiny_config  # noqa: F401 (an autouse fixture)
from transformers import AutoModelForCausalLM

from lorafleet.executor.galore import GaLoreAdamW, galore_param_groups
from lorafleet.scheduler.memory import (
    GALORE_PROJECTION_TYPES,
    ModelShape,
    galore_optimizer_bytes,
    galore_state_elements,
    size_galore_job,
)

RANK, GAP, SCALE, LR = 4, 3, 0.25, 1e-2


def tiny_model() -> torch.nn.Module:
    """Weights of both orientations ([24, 16]: rows >= cols, [12, 24]: rows < cols), biases and a norm (1-D)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.LayerNorm(24), torch.nn.GELU(),
                               torch.nn.Linear(24, 12, bias=False))


def param_groups(model: torch.nn.Module, **galore) -> list[dict]:
    """The 2-D weights in a GaLore group, the rest in a plain one (galore-torch's README's layout)."""
    matrices = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    return [{"params": rest}, {"params": matrices, **galore}]


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1, start: int = 0) -> None:
    """Steps start..steps-1 of a batch sequence fixed by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(8, 16, generator=generator).to(next(model.parameters()).dtype)
        if step < start:
            continue
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# "full" is left out: at a refresh step its projected gradient Pₗᵀ G Pᵣᵀ is diag(σ₁..σᵣ) up to rounding, and Adam's
# first step (M̂ / sqrt(V̂): about ±1 per element) turns the off-diagonal rounding noise into a full-size update, so
# two fp32 implementations differ by the order of their float operations (galore-torch against itself with
# contiguous copies of U and Vᴴ differs as much). It is checked in float64 against the paper's algorithm instead.
@pytest.mark.parametrize("proj_type", ("std", "reverse_std", "left", "right"))
def test_the_weights_equal_galore_torch_after_steps_across_projection_refreshes(proj_type):
    from galore_torch import GaLoreAdamW as ReferenceGaLoreAdamW

    ours, reference = tiny_model(), tiny_model()
    # eps tiny: galore-torch adds eps to sqrt(V) before the bias correction, torch's AdamW (and we) after it; weight
    # decay off: galore-torch decays after the update, we before (test_plain_parameters_step_as_torch_adamw).
    options = dict(rank=RANK, update_proj_gap=GAP, scale=SCALE, proj_type=proj_type)
    ours_optimizer = GaLoreAdamW(param_groups(ours, galore=True, **options), lr=LR, eps=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reference_optimizer = ReferenceGaLoreAdamW(param_groups(reference, **options), lr=LR, eps=1e-12)
    steps = 2 * GAP + 1  # projections from steps 0, 3 and 6
    train(ours, ours_optimizer, steps)
    train(reference, reference_optimizer, steps)

    initial = tiny_model()
    for (name, ours_param), reference_param, initial_param in zip(
            ours.named_parameters(), reference.parameters(), initial.parameters()):
        assert not torch.equal(ours_param, initial_param), name  # it trained
        torch.testing.assert_close(ours_param, reference_param, rtol=1e-5, atol=1e-6, msg=name)


def paper_galore_step(weight, grad, state, step, proj_type, eps=1e-8, beta1=0.9, beta2=0.999):
    """One step of the paper's Algorithm 2 (GaLore with Adam) on a [m, n] weight, written out for the float64 check."""
    rows, cols = weight.shape
    if step % GAP == 0:
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        left = proj_type in ("left", "full") or (proj_type == "std" and rows < cols) or (
            proj_type == "reverse_std" and rows >= cols)
        right = proj_type in ("right", "full") or not left
        state["P"] = (u[:, :RANK] if left else None, vh[:RANK] if right else None)
    p_left, p_right = state["P"]
    r = grad
    r = p_left.T @ r if p_left is not None else r
    r = r @ p_right.T if p_right is not None else r
    state["M"] = beta1 * state.get("M", 0) + (1 - beta1) * r
    state["V"] = beta2 * state.get("V", 0) + (1 - beta2) * r * r
    m_hat, v_hat = state["M"] / (1 - beta1 ** (step + 1)), state["V"] / (1 - beta2 ** (step + 1))
    n = m_hat / (v_hat.sqrt() + eps)
    n = p_left @ n if p_left is not None else n
    n = n @ p_right if p_right is not None else n
    weight -= LR * SCALE * n


@pytest.mark.parametrize("proj_type", GALORE_PROJECTION_TYPES)
def test_the_weights_equal_the_papers_algorithm_in_float64(proj_type):
    ours, reference = tiny_model().double(), tiny_model().double()
    matrices = [p for p in ours.parameters() if p.dim() == 2]
    optimizer = GaLoreAdamW([{"params": matrices, "galore": True}], lr=LR, rank=RANK, update_proj_gap=GAP,
                            scale=SCALE, proj_type=proj_type)
    generator = torch.Generator().manual_seed(1)
    states = {}
    for step in range(2 * GAP + 1):
        x = torch.randn(8, 16, generator=generator, dtype=torch.float64)
        for model in (ours, reference):
            model(x).pow(2).mean().backward()
        optimizer.step()
        with torch.no_grad():
            for name, weight in reference.named_parameters():
                if weight.dim() == 2:
                    paper_galore_step(weight, weight.grad, states.setdefault(name, {}), step, proj_type)
        for model in (ours, reference):
            model.zero_grad(set_to_none=True)
    for (name, ours_param), reference_param in zip(ours.named_parameters(), reference.parameters()):
        if ours_param.dim() == 2:
            assert not torch.equal(ours_param, tiny_model().double().get_parameter(name)), name
            torch.testing.assert_close(ours_param, reference_param, rtol=1e-10, atol=1e-12, msg=name)


def test_a_refresh_changes_the_projection_only_every_update_proj_gap_steps():
    model = tiny_model()
    optimizer = GaLoreAdamW(param_groups(model, galore=True), lr=LR, rank=RANK, update_proj_gap=GAP)
    weight = model[0].weight  # [24, 16]: std projects on the right
    projections = []
    for step in range(2 * GAP):
        train(model, optimizer, 1, seed=step)
        projections.append(optimizer.state[weight]["projection_right"].clone())
    same = [torch.equal(projections[i], projections[i + 1]) for i in range(len(projections) - 1)]
    assert same == [True, True, False, True, True]


def test_plain_parameters_step_as_torch_adamw():
    ours, reference = tiny_model(), tiny_model()
    options = dict(lr=LR, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    train(ours, GaLoreAdamW(ours.parameters(), **options), 5)
    train(reference, torch.optim.AdamW(reference.parameters(), foreach=False, **options), 5)
    for ours_param, reference_param in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(ours_param, reference_param, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("proj_type", GALORE_PROJECTION_TYPES)
def test_a_weight_keeps_projected_moments_the_memory_model_counts(proj_type):
    model = tiny_model()
    optimizer = GaLoreAdamW(param_groups(model, galore=True), lr=LR, rank=RANK, proj_type=proj_type)
    train(model, optimizer, 1)
    for weight in (model[0].weight, model[3].weight):
        rows, cols = weight.shape
        state = optimizer.state[weight]
        moment, projection = galore_state_elements(rows, cols, RANK, proj_type)
        assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == moment
        assert RANK in state["exp_avg"].shape or state["exp_avg"].shape == (RANK, RANK)
        projections = [state[key] for key in ("projection_left", "projection_right") if key in state]
        assert sum(p.numel() for p in projections) == projection
        kept = [state["exp_avg"], state["exp_avg_sq"], *projections]
        # no view into a larger tensor (the SVD's whole U or Vᴴ) is what keeps them: their storage is their size
        assert [t.untyped_storage().nbytes() for t in kept] == [t.numel() * 4 for t in kept]
        assert 2 * moment + projection < 2 * rows * cols  # the saving is real: less than AdamW's two moments


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_checkpointed_optimizer_resumes_to_the_same_weights(dtype):
    straight, resumed = tiny_model().to(dtype), tiny_model().to(dtype)
    options = dict(lr=LR, rank=RANK, update_proj_gap=GAP)
    straight_optimizer = GaLoreAdamW(param_groups(straight, galore=True), **options)
    train(straight, straight_optimizer, 2 * GAP)

    first_optimizer = GaLoreAdamW(param_groups(resumed, galore=True), **options)
    train(resumed, first_optimizer, GAP - 1)
    saved = copy.deepcopy(first_optimizer.state_dict())
    second_optimizer = GaLoreAdamW(param_groups(resumed, galore=True), **options)
    second_optimizer.load_state_dict(saved)
    assert {t.dtype for state in second_optimizer.state.values() for t in state.values()
            if isinstance(t, torch.Tensor)} == {torch.float32}  # not cast to the weights' dtype
    train(resumed, second_optimizer, 2 * GAP, start=GAP - 1)  # across the refresh at step GAP
    for straight_param, resumed_param in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(straight_param, resumed_param, rtol=0, atol=0)


def test_an_unknown_projection_type_is_refused_by_name():
    with pytest.raises(ValueError, match="proj_type 'diagonal'"):
        GaLoreAdamW(tiny_model().parameters(), proj_type="diagonal")


@pytest.mark.parametrize("proj_type, target_modules", [("std", ["all-linear"]), ("full", ["q_proj", "down_proj"]),
                                                       ("reverse_std", ["k_proj", "up_proj"])])
def test_the_memory_model_counts_the_optimizer_state_a_galore_job_keeps(proj_type, target_modules):
    config = tiny_config("llama", vocab_size=96, hidden=64, layers=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    rank = 8
    optimizer = GaLoreAdamW(galore_param_groups(model, target_modules), lr=LR, rank=rank, proj_type=proj_type)
    ids = torch.randint(0, 96, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    kept = sum(t.untyped_storage().nbytes() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))
    assert len(optimizer.state) == len(list(model.parameters()))  # every parameter trained
    assert kept == galore_optimizer_bytes(ModelShape.from_config(config.to_dict()), rank, proj_type, target_modules)


LLAMA_1B = ModelShape(hidden_size=2048, intermediate_size=5461, num_layers=24, num_attention_heads=32,
                      num_kv_heads=32, vocab_size=32000, family="llama")  # the paper's 1B (its Table 2)


def test_a_galore_job_keeps_less_optimizer_state_than_adamw_on_the_1b_shape():
    adamw = 2 * 4 * LLAMA_1B.num_params()
    galore = galore_optimizer_bytes(LLAMA_1B, 512, "std", ["all-linear"])
    assert galore < 0.6 * adamw  # rank 512 of 2048: a quarter of the projected weights' moments, plus projections


def test_a_galore_jobs_weights_and_gradients_are_its_own():
    size = size_galore_job(LLAMA_1B, 512, "std", ["all-linear"], batch_size=4, max_seq_len=512, dtype="bfloat16")
    assert size.base_bytes == 2 * LLAMA_1B.num_params()  # its weights, in bf16: never quantized
    assert size.job_bytes - size.activation_bytes > 2 * LLAMA_1B.num_params() + galore_optimizer_bytes(
        LLAMA_1B, 512, "std", ["all-linear"])


def test_a_galore_job_on_a_moe_base_is_refused_by_name():
    moe = ModelShape(hidden_size=64, intermediate_size=128, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                     vocab_size=96, num_experts=4, expert_intermediate_size=32, family="qwen2_moe")
    with pytest.raises(ValueError, match="qwen2_moe has experts"):
        galore_optimizer_bytes(moe, 8, "std", ["all-linear"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape,side", [((96, 160), "left"), ((160, 96), "right"), ((96, 160), "both")])
def test_the_gpu_projections_span_the_svd_subspace(shape, side):
    """On a GPU the projections come from the Gram matrix's eigenvectors: the same subspace as the SVD's (a
    gradient with a clear gap after the rank-th singular value), orthonormal, in the SVD's shapes."""
    from lorafleet.executor.galore import top_singular_vectors

    rank = 12
    generator = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=generator))[0]
    right = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=generator))[0]
    values = torch.cat([torch.linspace(10, 5, rank), torch.linspace(1, 0.01, min(shape) - rank)])
    grad = left[:, :min(shape)] @ torch.diag(values) @ right[:min(shape)]
    want = top_singular_vectors(grad, rank, side)
    got = top_singular_vectors(grad.cuda(), rank, side)
    assert set(got) == set(want)
    for name, expected in want.items():
        columns = got[name].cpu() if name == "projection_left" else got[name].cpu().T
        reference = expected if name == "projection_left" else expected.T
        assert columns.shape == reference.shape
        assert torch.allclose(columns.T @ columns, torch.eye(rank), atol=1e-5)
        cosines = torch.linalg.svdvals(reference.T @ columns)  # of the principal angles between the subspaces
        assert cosines.min() > 1 - 1e-5
