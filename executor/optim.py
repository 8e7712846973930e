"""Per-job optimisation: AdamW with the job's own hyperparameters, warmup + schedule, and clipping by its own norm."""

from __future__ import annotations

import math
import warnings

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


class JobOptimizer:
    """`param_groups`: torch's groups, each with its own peak "lr" (the adapter's `param_groups`); the schedule scales
    every group alike, and clipping takes the norm over all of them. `optimizer`: one the caller built over
    `param_groups` (a GaLore job's GaLoreAdamW); by default torch's AdamW with the job's settings."""

    def __init__(self, param_groups: list[dict], hp: Hyperparameters, total_steps: int,
                 optimizer: torch.optim.Optimizer | None = None):
        self.params = params = [param for group in param_groups for param in group["params"]]
        self.max_grad_norm = hp.max_grad_norm
        self.optimizer = optimizer or torch.optim.AdamW(
            param_groups,
            lr=hp.learning_rate,
            betas=(hp.adam_beta1, hp.adam_beta2),
            eps=hp.adam_epsilon,
            weight_decay=hp.weight_decay,
            # one fused kernel per step on a GPU instead of a dozen multi-tensor passes: the per-job step is
            # launch-bound (hundreds of small adapter tensors)
            fused=bool(params) and params[0].is_cuda,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, hp.warmup_steps, total_steps, hp.lr_scheduler)
        )
        self.launched = False  # launch_step queued this window's update; step() finishes it
        self.grad_buffer: torch.Tensor | None = None  # while a step graph holds the grads as its views (step_graph.py)

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
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.max_grad_norm, norm)
        self.optimizer.found_inf = (~(torch.isfinite(norm) & torch.isfinite(loss))).float()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self.launched = True

    def step(self, norm: torch.Tensor, norm_value: float) -> None:
        """Clip by `norm` (grad_norm(), read by the caller as `norm_value`), step, advance the schedule, clear the grads
        (after launch_step: only the last two).

        Raises NonFiniteGradients (and leaves the weights untouched) when the norm is NaN or inf.
        """
        if not math.isfinite(norm_value):
            self.zero_grad()
            raise NonFiniteGradients(f"gradient norm is {norm_value}")
        if not self.launched:
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.max_grad_norm, norm)
            self.optimizer.step()
        self.scheduler.step()
        self.zero_grad()

    def skip_update(self) -> None:
        """End the window without touching the weights or AdamW's moments: advance the schedule, clear the grads."""
        with warnings.catch_warnings():
            # The scheduler warns when it steps before any optimizer step; skipping that step here is deliberate.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        self.zero_grad()

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
        self.scheduler.load_state_dict(state["scheduler"])
