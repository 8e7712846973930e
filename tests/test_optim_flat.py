"""The fused AdamW over one flat tensor per group (optim.py's `FlatAdamW`) against torch's fused AdamW over each
parameter, on the CPU (torch has a fused AdamW there too): the same bits, the same state_dict."""

import functools
import io
import math

import pytest
import torch
from helpers_models import alpaca_rows, llama, single_torch_thread, write_jsonl  # noqa: F401 (fixtures)

from lorafleet.executor import cohort as cohort_module
from lorafleet.executor import optim
from lorafleet.executor.cohort import Cohort
from lorafleet.executor.optim import JobOptimizer
from lorafleet.scheduler.spec import Hyperparameters, parse_spec

SHAPES = [(16, 24), (40, 16), (16, 24), (8, 16), (33,)]
HP = Hyperparameters(learning_rate=3e-3, weight_decay=0.1, max_grad_norm=0.5, warmup_steps=1, lr_scheduler="linear")


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]


def groups_of(params, two_groups: bool) -> list[dict]:
    """One group, or LoRA+'s two (the second at 4x the rate)."""
    if not two_groups:
        return [{"params": params, "lr": HP.learning_rate}]
    return [{"params": params[0::2], "lr": HP.learning_rate}, {"params": params[1::2], "lr": 4 * HP.learning_rate}]


def gradients(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


class TorchReference:
    """What JobOptimizer's fused step is: torch's fused AdamW over each parameter, its norm, clip and skip."""

    def __init__(self, params, two_groups: bool):
        groups = groups_of(params, two_groups)
        self.params = [param for group in groups for param in group["params"]]  # the norm's order is the groups'
        self.optimizer = torch.optim.AdamW(groups, lr=HP.learning_rate, betas=(
            HP.adam_beta1, HP.adam_beta2), eps=HP.adam_epsilon, weight_decay=HP.weight_decay, fused=True)

    def step(self, loss: float) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        torch.nn.utils.clip_grads_with_norm_(self.params, HP.max_grad_norm, norm)
        self.optimizer.found_inf = (~(torch.isfinite(norm) & torch.isfinite(torch.tensor(loss)))).float()
        self.optimizer.step()
        del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)


def flat_optimizer(params, two_groups: bool) -> JobOptimizer:
    optimizer = JobOptimizer(groups_of(params, two_groups), HP, total_steps=8, fused=True)
    assert optimizer.flat is not None
    return optimizer


def step_flat(optimizer: JobOptimizer, loss: float) -> None:
    norm = optimizer.grad_norm()
    optimizer.launch_step(norm, torch.tensor(loss))
    if not math.isnan(loss):  # a NaN loss fails the job: its window ends unstepped
        optimizer.step(norm, float(norm))
    else:
        optimizer.skip_update()


def step_both(flat: JobOptimizer, reference: TorchReference, loss: float) -> None:
    """One step of each, the reference at the rates JobOptimizer's schedule gives this step."""
    for theirs, ours in zip(reference.optimizer.param_groups, flat.optimizer.param_groups):
        theirs["lr"] = ours["lr"]
    step_flat(flat, loss)
    reference.step(loss)


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def assert_same_state(flat: JobOptimizer, reference: TorchReference) -> None:
    for mine, theirs in zip(flat.params, reference.params):
        assert_bitwise(mine.detach(), theirs.detach())
    ours, torchs = flat.optimizer.state_dict()["state"], reference.optimizer.state_dict()["state"]
    assert set(ours) == set(torchs)
    for index, state in torchs.items():
        for key, value in state.items():
            assert_bitwise(ours[index][key], value)


@pytest.mark.parametrize("two_groups", [False, True])
def test_a_flat_update_is_torchs_fused_adamw_bit_for_bit_skipped_steps_included(two_groups):
    flat_params, torch_params = make_params(), make_params()
    flat, reference = flat_optimizer(flat_params, two_groups), TorchReference(torch_params, two_groups)
    storages = {p.untyped_storage().data_ptr() for p in flat_params}
    assert len(storages) == (2 if two_groups else 1), "each group's parameters are views of one tensor"
    for step, loss in enumerate([1.0, 2.0, float("nan"), 0.5, 1.5]):
        for params in (flat_params, torch_params):
            for param, grad in zip(params, gradients(step)):
                param.grad = grad.clone()
        step_both(flat, reference, loss)
        assert_same_state(flat, reference)
    assert flat.flat.uniform
    assert float(flat.optimizer.state[flat_params[0]]["step"]) == 4, "the non-finite step did not count"


def test_a_step_graphs_gradient_buffer_is_updated_from_in_place():
    """While a step graph holds the gradients they are views of one buffer in the optimizer's order: the update
    reads its group slices, and clipping multiplies it as one tensor."""
    flat_params, torch_params = make_params(), make_params()
    flat, reference = flat_optimizer(flat_params, True), TorchReference(torch_params, True)
    buffer = torch.zeros(sum(p.numel() for p in flat.params))
    views = [chunk.view_as(p) for chunk, p in zip(buffer.split([p.numel() for p in flat.params]), flat.params)]
    flat.grad_buffer = buffer
    for step in range(3):
        for param, view, grad in zip(flat.params, views, gradients(step)[0::2] + gradients(step)[1::2]):
            view.copy_(grad)
            param.grad = view
        for param, grad in zip(torch_params, gradients(step)):
            param.grad = grad.clone()
        step_both(flat, reference, 1.0)
        assert buffer.eq(0).all(), "zero_grad clears the buffer, the views stay"
        assert_same_state(flat, reference)


def test_a_parameter_without_a_gradient_is_skipped_as_torch_skips_it():
    flat_params, torch_params = make_params(), make_params()
    flat, reference = flat_optimizer(flat_params, False), TorchReference(torch_params, False)
    for step in range(4):
        for params in (flat_params, torch_params):
            for i, (param, grad) in enumerate(zip(params, gradients(step))):
                param.grad = None if step == 1 and i == 3 else grad.clone()
        step_both(flat, reference, 1.0)
        assert_same_state(flat, reference)
    assert not flat.flat.uniform, "step counts differ: torch's per-parameter step from then on"


def test_a_flat_optimizers_checkpoint_resumes_it_and_loads_into_torchs_adamw():
    params = make_params()
    flat = flat_optimizer(params, True)
    for step in range(2):
        for param, grad in zip(params, gradients(step)):
            param.grad = grad.clone()
        step_flat(flat, 1.0)
    saved = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "optimizer": flat.state_dict()}, saved)

    def restored(make):
        saved.seek(0)
        checkpoint = torch.load(saved)
        copies = make_params(seed=1)
        with torch.no_grad():
            for copy, value in zip(copies, checkpoint["params"]):
                copy.copy_(value)
        return copies, make(copies, checkpoint["optimizer"])

    def flat_resumed(copies, state):
        optimizer = flat_optimizer(copies, True)
        optimizer.load_state_dict(state)
        return optimizer

    def torch_resumed(copies, state):
        reference = TorchReference(copies, True)
        reference.optimizer.load_state_dict(state["optimizer"])
        return reference

    (resumed_params, resumed), (torch_params, reference) = restored(flat_resumed), restored(torch_resumed)
    assert resumed.flat.uniform
    for step in range(2, 4):
        for group_params in (params, resumed_params, torch_params):
            for param, grad in zip(group_params, gradients(step)):
                param.grad = grad.clone()
        step_flat(flat, 1.0)
        step_both(resumed, reference, 1.0)
    for mine, theirs, uninterrupted in zip(resumed_params, torch_params, params):
        assert_bitwise(mine.detach(), uninterrupted.detach())
        assert_bitwise(theirs.detach(), uninterrupted.detach())


def test_a_cohort_of_flat_optimizers_trains_checkpoints_and_resumes_as_torchs_fused_adamw(tmp_path, llama,
                                                                                           monkeypatch):
    """Through the cohort (on the CPU, made fused as on a GPU): a LoRA+ job (two groups) and a NOLA job, with
    accumulation and weight decay, stopped half-way through a window, checkpointed and resumed, train to the same
    bits as torch's fused AdamW over each parameter does uninterrupted."""
    dataset = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(9, seed=2))
    common = {"batch_size": 2, "learning_rate": 2e-2, "gradient_accumulation_steps": 2, "weight_decay": 0.1,
              "warmup_steps": 1, "lr_scheduler": "cosine"}
    specs = {job_id: parse_spec({"base_model": str(llama), "dataset": "unused", "adapter": adapter,
                                 "hyperparameters": {**common, "seed": seed}})
             for job_id, adapter, seed in [("lora", {"r": 4, "loraplus_lr_ratio": 4.0}, 1),
                                           ("nola", {"type": "nola", "r": 4, "nola": {"num_basis": 8}}, 2)]}
    monkeypatch.setattr(cohort_module, "JobOptimizer", functools.partial(JobOptimizer, fused=True))

    def cohort_of_both(resume_from=None) -> Cohort:
        cohort = Cohort(llama)
        for job_id, spec in specs.items():
            cohort.add_job(job_id, spec, dataset, resume_from=resume_from and resume_from / job_id)
        return cohort

    def train(cohort: Cohort, steps: int) -> None:
        for _ in range(steps):
            cohort.step()

    def adapters(cohort: Cohort) -> dict[str, dict[str, torch.Tensor]]:
        return {job_id: {k: v.clone() for k, v in job.adapter.state_dict().items()}
                for job_id, job in cohort.jobs.items()}

    first = cohort_of_both()
    assert all(job.optimizer.flat is not None for job in first.jobs.values())
    train(first, 3)  # the third micro-batch opens the second window: gradients pending
    for job_id in specs:
        first.checkpoint(job_id, tmp_path / "ckpt" / job_id)
    train(first, 3)
    resumed = cohort_of_both(resume_from=tmp_path / "ckpt")
    train(resumed, 3)
    monkeypatch.setattr(optim.FlatAdamW, "applies", classmethod(lambda cls, optimizer: False))
    per_parameter = cohort_of_both()
    assert all(job.optimizer.flat is None for job in per_parameter.jobs.values())
    train(per_parameter, 6)
    want = adapters(per_parameter)
    for got in (adapters(first), adapters(resumed)):
        assert got.keys() == want.keys()
        for job_id, tensors in want.items():
            assert all(torch.equal(got[job_id][key], tensor) for key, tensor in tensors.items()), job_id


def test_a_state_saved_before_any_step_loads_as_zero_moments():
    """torch's AdamW (the engine before the flat one) holds no state until its first step: such a checkpoint resumes
    as a fresh optimizer."""
    flat_params, torch_params = make_params(), make_params()
    reference = TorchReference(torch_params, True)
    flat = flat_optimizer(flat_params, True)
    flat.optimizer.state[flat_params[0]]["exp_avg"].fill_(5.0)  # whatever it held is replaced
    flat.load_state_dict({"optimizer": reference.optimizer.state_dict(), "scheduler": flat.scheduler.state_dict()})
    assert flat.flat.uniform
    for step in range(2):
        for params in (flat_params, torch_params):
            for param, grad in zip(params, gradients(step)):
                param.grad = grad.clone()
        step_both(flat, reference, 1.0)
        assert_same_state(flat, reference)
