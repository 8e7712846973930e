"""GaLore (Zhao et al., 2024: "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection"): full-parameter
AdamW whose moments live in a rank-r projection of each 2-D weight's gradient.

For a weight W [m, n] with gradient G, every `update_proj_gap` steps P is refreshed from the SVD of that step's G
(the top-r left singular vectors, [m, r], or right ones, [r, n]: `memory.galore_projection_side`). Each step

    R = project(G)                       # Pᵀ G  or  G Pᵀ: [r, n] or [m, r]
    M, V = Adam's moments of R           # r x n (or m x r) each instead of m x n
    N = M̂ / (sqrt(V̂) + eps)             # bias-corrected, as AdamW
    W -= lr * scale * project_back(N)    # P N  or  N P: [m, n]

The moments are not re-projected when P changes (the paper's choice: the subspaces of consecutive periods are close
enough). Parameters of a group without `galore=True`, and any that is not 2-D, take a plain AdamW step. Decoupled
weight decay is torch's AdamW's (W *= 1 - lr * wd before the update), on every parameter.

The moments and projections are kept in fp32 (fp64 for fp64 weights) whatever the weights' dtype; the state holds
tensors and the step count only (no projector objects), so that `state_dict()` checkpoints it. Checked against
galore-torch's GaLoreAdamW and a float64 transcription of the paper's algorithm (tests/test_galore.py).
"""

from __future__ import annotations

import torch

from lorafleet.scheduler.base_modules import name_matches
from lorafleet.scheduler.memory import GALORE_PROJECTION_TYPES, galore_projection_side
from lorafleet.scheduler.spec import ALL_LINEAR, ALL_PROJECTIONS


def galore_param_groups(model: torch.nn.Module, target_modules) -> list[dict]:
    """The model's trainable parameters in two groups: the weights of the Linear layers `target_modules` names
    (PEFT's matching; "all-linear": Llama's seven projections) with `galore=True`, every other one (embeddings, head,
    norms, biases) plain AdamW, as GaLore trains them."""
    targets = ALL_PROJECTIONS if tuple(target_modules) == (ALL_LINEAR,) else tuple(target_modules)
    projected = {id(module.weight) for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) and any(name_matches(name, t) for t in targets)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in projected]},
            {"params": [p for p in params if id(p) in projected], "galore": True}]


def top_singular_vectors(grad: torch.Tensor, rank: int, side: str) -> dict[str, torch.Tensor]:
    """The projection(s) for `side`: "left" the first r left singular vectors of `grad` as columns [m, r], "right"
    the first r right singular vectors as rows [r, n]. Fresh tensors, so no view keeps whole factors alive.

    On the CPU from `torch.linalg.svd`, as galore-torch computes them (the tests compare with it). On a GPU from the
    eigenvectors of the smaller Gram matrix G Gᵀ or Gᵀ G in float64: cuSOLVER's full SVD of one 1B-shape gradient
    takes 120-240 ms on the H200 against ~27 ms for this (bench/results: run P6), and the refresh step of a 1B job
    was 20 s. Same subspace, the singular vectors' signs are arbitrary either way."""
    if grad.is_cuda:
        return _top_singular_vectors_by_eigh(grad, rank, side)
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    projections = {}
    if side in ("left", "both"):
        projections["projection_left"] = u[:, :rank].clone()
    if side in ("right", "both"):
        projections["projection_right"] = vh[:rank, :].clone()
    return projections


def _top_eigenvectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """The eigenvectors of the `rank` largest eigenvalues of a symmetric matrix, largest first, as columns."""
    _, vectors = torch.linalg.eigh(gram.double())
    return vectors[:, -rank:].flip(1)


def _top_singular_vectors_by_eigh(grad: torch.Tensor, rank: int, side: str) -> dict[str, torch.Tensor]:
    g = grad.float()
    projections = {}
    if side in ("left", "both"):
        projections["projection_left"] = _top_eigenvectors(g @ g.T, rank).to(grad.dtype).contiguous()
    if side in ("right", "both"):
        projections["projection_right"] = _top_eigenvectors(g.T @ g, rank).T.to(grad.dtype).contiguous()
    return projections


def project(grad: torch.Tensor, state: dict) -> torch.Tensor:
    """The gradient in the low-rank subspace: Pₗᵀ G and/or G Pᵣᵀ."""
    if "projection_left" in state:
        grad = state["projection_left"].T @ grad
    if "projection_right" in state:
        grad = grad @ state["projection_right"].T
    return grad


def project_back(update: torch.Tensor, state: dict) -> torch.Tensor:
    """A low-rank update back in the weight's space: Pₗ N and/or N Pᵣ."""
    if "projection_left" in state:
        update = state["projection_left"] @ update
    if "projection_right" in state:
        update = update @ state["projection_right"]
    return update


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore's projection on the 2-D parameters of groups that set `galore=True`.

    Group options (defaults as galore-torch's): rank (128), update_proj_gap (200), scale (0.25), proj_type ("std").
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: str = "std"):
        if proj_type not in GALORE_PROJECTION_TYPES:
            raise ValueError(f"unknown GaLore proj_type {proj_type!r}; expected one of {GALORE_PROJECTION_TYPES}")
        for name, value in (("rank", rank), ("update_proj_gap", update_proj_gap)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GaLore {name} must be a positive integer, got {value!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, galore=False, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type)
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, then the saved moments and projections again at their own precision: torch casts a floating
        state tensor to its parameter's dtype, which would leave a bf16 model's fp32 state in bf16."""
        super().load_state_dict(state_dict)
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for index, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(index, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[param][key] = value.to(param.device, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._step_param(param, group)
        return loss

    def _step_param(self, param: torch.Tensor, group: dict) -> None:
        grad = param.grad.to(torch.promote_types(param.dtype, torch.float32))
        state = self.state[param]
        if not state:
            state["step"] = 0  # a host int: the refresh test reads it every step, and a tensor would sync a GPU
        galore = group["galore"] and param.dim() == 2
        if galore and state["step"] % group["update_proj_gap"] == 0:
            side = galore_projection_side(*param.shape, group["proj_type"])
            state.update(top_singular_vectors(grad, group["rank"], side))
        if galore:
            grad = project(grad, state)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["step"] += 1
        update = self._adam_direction(grad, state, group)
        if galore:
            update = project_back(update, state) * group["scale"]
        if group["weight_decay"]:
            param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(update.to(param.dtype), alpha=-group["lr"])

    @staticmethod
    def _adam_direction(grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Update Adam's moments with `grad` and return the bias-corrected M̂ / (sqrt(V̂) + eps)."""
        beta1, beta2 = group["betas"]
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
        return exp_avg / (1 - beta1 ** step) / denom
