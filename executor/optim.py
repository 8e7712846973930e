"""Per-job optimisation: AdamW with the job's own hyperparameters, warmup + schedule, and clipping by its own norm."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from lorafleet.scheduler.spec import Hyperparameters


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based), as Hugging Face's schedulers."""
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr schedule {schedule!r}; expected constant, linear or cosine")


class NonFiniteGradients(RuntimeError):
    pass


@dataclass
class _FlatGroup:
    """One parameter group of a fused AdamW with its parameters, moments and step counts as views of one tensor
    each: torch's own state entries are those views, so its state_dict (and a checkpoint) is as it would be."""

    params: list[torch.Tensor]
    sizes: list[int]
    param: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    steps: torch.Tensor  # fp32 [params]: each parameter's "step" is a 0-dim view

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer, group: dict) -> _FlatGroup:
        params = group["params"]
        sizes = [param.numel() for param in params]
        flat = torch.cat([param.detach().reshape(-1) for param in params])
        exp_avg, exp_avg_sq = torch.zeros_like(flat), torch.zeros_like(flat)
        steps = torch.zeros(len(params), dtype=torch.float32, device=flat.device)
        for param, view in zip(params, flat.split(sizes)):
            param.data = view.view_as(param)
        flat_group = cls(params, sizes, flat, exp_avg, exp_avg_sq, steps)
        flat_group.point_state(optimizer)
        return flat_group

    def point_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Make torch's state of each parameter the views of the flat moments and steps."""
        for i, (param, exp_avg, exp_avg_sq) in enumerate(zip(self.params, self.exp_avg.split(self.sizes),
                                                              self.exp_avg_sq.split(self.sizes))):
            optimizer.state[param] = {"step": self.steps[i], "exp_avg": exp_avg.view_as(param),
                                      "exp_avg_sq": exp_avg_sq.view_as(param)}

    @torch.no_grad()
    def take_state(self, optimizer: torch.optim.Optimizer) -> bool:
        """Copy what `optimizer.load_state_dict` put in torch's state into the flat tensors (a parameter without
        state: zeros) and point the state back at them; whether every parameter's step count is now the same."""
        loaded = [optimizer.state.get(param, {}) for param in self.params]
        for flat, key in ((self.exp_avg, "exp_avg"), (self.exp_avg_sq, "exp_avg_sq")):
            flat.copy_(torch.cat([state[key].reshape(-1).to(flat) if key in state else flat.new_zeros(size)
                                  for state, size in zip(loaded, self.sizes)]))
        self.steps.copy_(torch.tensor([float(state.get("step", 0)) for state in loaded]))
        self.point_state(optimizer)
        return bool(self.steps.eq(self.steps[0]).all())

    def update(self, group: dict, grad: torch.Tensor, found_inf: torch.Tensor) -> None:
        """torch's fused AdamW step (`torch.optim.adam._fused_adam`) over the whole group at once, with `group`'s
        settings (torch's param group now: the scheduler moves its "lr"): the same arithmetic on every element, so
        the same bits as torch's step over each parameter."""
        beta1, beta2 = group["betas"]
        self.steps.add_(1)
        torch._fused_adamw_([self.param], [grad], [self.exp_avg], [self.exp_avg_sq], [], [self.steps[0]],
                            amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
                            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False, grad_scale=None,
                            found_inf=found_inf)
        self.steps.sub_(found_inf)


class FlatAdamW:
    """A fused AdamW's update as one kernel per parameter group. torch's fused step hands its kernel ~36 tensors a
    launch, one thread block each, and a LoRA job has hundreds of small ones: a 1B cohort of 8 jobs took 56 such
    launches and 2.4 ms a step, ~1 TB/s on an H100 (run H30's trace). With each group's parameters, moments and
    steps views of one tensor, one launch covers millions of elements."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.groups = [_FlatGroup.of(optimizer, group) for group in optimizer.param_groups]
        self.sizes = [flat.param.numel() for flat in self.groups]
        self.uniform = True  # every parameter took every step: torch's own step skips one without a gradient

    @classmethod
    def applies(cls, optimizer: torch.optim.Optimizer) -> bool:
        params = [param for group in optimizer.param_groups for param in group["params"]]
        return (bool(params) and not optimizer.state and all(param.requires_grad for param in params)
                and len({(param.dtype, param.device) for param in params}) == 1
                and not any(group["amsgrad"] or group["maximize"] or group["differentiable"]
                            for group in optimizer.param_groups))

    def grads(self, grad_buffer: torch.Tensor | None) -> list[torch.Tensor] | None:
        """Each group's gradients as one tensor: slices of the step graph's buffer (laid out as the optimizer's
        parameters), else joined; None when a parameter has none (torch's own step then skips it)."""
        if grad_buffer is not None:
            return list(grad_buffer.split(self.sizes))
        grads = [[param.grad for param in flat.params] for flat in self.groups]
        if any(grad is None for group in grads for grad in group):
            return None
        return [torch.cat([grad.reshape(-1) for grad in group]) for group in grads]

    def update(self, optimizer: torch.optim.Optimizer, grads: list[torch.Tensor], found_inf: torch.Tensor) -> None:
        for flat, group, grad in zip(self.groups, optimizer.param_groups, grads):
            flat.update(group, grad, found_inf)

    def take_state(self, optimizer: torch.optim.Optimizer) -> None:
        self.uniform = all([flat.take_state(optimizer) for flat in self.groups])


class JobOptimizer:
    """`param_groups`: torch's groups, each with its own peak "lr" (the adapter's `param_groups`); the schedule scales
    every group alike, and clipping takes the norm over all of them. `optimizer`: one the caller built over
    `param_groups` (a GaLore job's GaLoreAdamW); by default torch's AdamW with the job's settings."""

    def __init__(self, param_groups: list[dict], hp: Hyperparameters, total_steps: int,
                 optimizer: torch.optim.Optimizer | None = None, fused: bool | None = None):
        self.params = params = [param for group in param_groups for param in group["params"]]
        self.max_grad_norm = hp.max_grad_norm
        # fused (by default on a GPU): one kernel per group a step instead of a dozen multi-tensor passes per
        # parameter list; the per-job step is launch-bound (hundreds of small adapter tensors)
        fused = bool(params) and params[0].is_cuda if fused is None else fused
        self.optimizer = optimizer or torch.optim.AdamW(
            param_groups,
            lr=hp.learning_rate,
            betas=(hp.adam_beta1, hp.adam_beta2),
            eps=hp.adam_epsilon,
            weight_decay=hp.weight_decay,
            fused=fused,
        )
        # the parameters become views of one tensor per group: their data moves there now
        self.flat = FlatAdamW(self.optimizer) if optimizer is None and fused and FlatAdamW.applies(
            self.optimizer) else None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, hp.warmup_steps, total_steps, hp.lr_scheduler)
        )
        self.launched = False  # launch_step queued this window's update; step() finishes it
        # while a step graph holds the grads as its views (step_graph.py): the buffer, laid out as `params`
        self.grad_buffer: torch.Tensor | None = None

    @property
    def lr(self) -> float:
        """The job's learning rate now (the first group's: the one at the job's own rate)."""
        return self.optimizer.param_groups[0]["lr"]

    def grad_norm(self) -> torch.Tensor:
        """The norm of all this job's gradients, left on the device: the cohort reads every job's in one sync."""
        grads = [p.grad for p in self.params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.params[0].device)

    def launch_step(self, norm: torch.Tensor, loss: torch.Tensor) -> None:
        """With fused AdamW (on a GPU): clip and update now, before the host has read `norm`, so that the launches
        overlap the step's GPU work; the kernels skip the update (weights, moments, step count) on the device when
        `norm` or `loss` is not finite. step() then finishes the window. Elsewhere nothing: step() does it all."""
        if not self.optimizer.defaults.get("fused"):
            return
        self._clip(norm)
        found_inf = (~(torch.isfinite(norm) & torch.isfinite(loss))).float()
        grads = self.flat.grads(self.grad_buffer) if self.flat is not None and self.flat.uniform else None
        if grads is not None:
            self.flat.update(self.optimizer, grads, found_inf)
        else:
            if self.flat is not None:  # torch's step skips a parameter without a gradient, and its step count
                self.flat.uniform = False
            self.optimizer.found_inf = found_inf
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        self.launched = True

    def _clip(self, norm: torch.Tensor) -> None:
        """torch's `clip_grads_with_norm_`; a step graph's buffer of gradients is multiplied as one tensor (the same
        bits as one multiply per gradient, in one kernel)."""
        if self.max_grad_norm is None:
            return
        grads = [self.grad_buffer] if self.grad_buffer is not None else [p.grad for p in self.params
                                                                          if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, torch.clamp(float(self.max_grad_norm) / (norm + 1e-6), max=1.0))

    def step(self, norm: torch.Tensor, norm_value: float) -> None:
        """Clip by `norm` (grad_norm(), read by the caller as `norm_value`), step, advance the schedule, clear the grads
        (after launch_step: only the last two).

        Raises NonFiniteGradients (and leaves the weights untouched) when the norm is NaN or inf.
        """
        if not math.isfinite(norm_value):
            self.zero_grad()
            raise NonFiniteGradients(f"gradient norm is {norm_value}")
        if not self.launched:
            self._clip(norm)
            self.optimizer.step()
        self._advance_schedule()
        self.zero_grad()

    def skip_update(self) -> None:
        """End the window without touching the weights or AdamW's moments: advance the schedule, clear the grads."""
        self._advance_schedule()
        self.zero_grad()

    def _advance_schedule(self) -> None:
        with warnings.catch_warnings():
            # The scheduler warns when it steps before any call of torch's `optimizer.step`: a skipped update, or
            # `FlatAdamW`'s, which runs its kernel itself.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()

    def zero_grad(self) -> None:
        """Clear the window's gradients: to None, or while a step graph holds them as views of one buffer, that
        buffer zeroed by one kernel (the graph writes into the views: re-pointing every .grad at them each step
        would cost the host ~0.2 ms a job)."""
        if self.grad_buffer is not None:
            self.grad_buffer.zero_()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.launched = False

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.flat is not None:
            self.flat.take_state(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
