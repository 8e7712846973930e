"""A GaLore job (issue 18): full-parameter training of its own copy of the base, with GaLore's low-rank projected
AdamW (executor/galore.py) on the targeted 2-D projections and plain AdamW on every other parameter.

A GaLore job owns every weight it trains, so it cannot share a frozen base with LoRA jobs: it runs alone (a one-job
cohort). Everything around the optimizer is what a LoRA job of the cohort does, reused from it: the data (JobData: same
formats, truncation, shuffling and resumable cursor), the packing of a micro-batch's sequences into one row with
attention per sequence, the loss (the mean over the micro-batch's target tokens, each micro-batch of an accumulation
window weighted 1/window), the schedule, clipping and the non-finite checks (JobOptimizer). The head trains, so the
loss is cross-entropy over the model's own logits rather than the cohort's chunked loss over a frozen head. The base's
dropout stays off (eval mode), as in LoRA jobs: the run is a function of the seed and the data alone.

The recipe, one micro-batch per `step()`:

    examples = data.next_batch()                       # a bad line: the job fails, naming the line
    loss = CE(model(pack(examples)).logits, targets)   # summed over target tokens
    (loss / (targets * window)).backward()
    when the window is full:
        norm = ||grads||                               # not finite: the job fails, weights untouched
        clip to max_grad_norm; GaLoreAdamW.step(); lr = peak * lr_factor(step)

    job = GaloreJob("/models/llama", GaloreSettings(rank=128), hyperparameters, "/data/train.jsonl")
    while job.active:
        result = job.step()                  # StepResult
        if result.checkpoint_due:
            job.checkpoint("/ckpt/job-1")    # resume: GaloreJob(..., resume_from="/ckpt/job-1")
    job.export("/out/job-1")                 # a full model: AutoModelForCausalLM.from_pretrained loads it

A checkpoint directory is an export (the model's weights in its compute dtype, config, tokenizer) plus
`training_state.pt`: the optimizer's state (GaLore's projections and fp32 moments, AdamW's moments), the schedule,
the window's pending gradients, the counters and the data cursor. Resuming loads the model from it, so a resumed run
ends bitwise equal to an uninterrupted one (on the CPU; tests/test_galore_job.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafleet.executor.checkpoint import read_training_state, save_training_state
from lorafleet.executor.cohort import StepResult, pack, run_length, split_passes
from lorafleet.executor.data import IGNORE_INDEX, DataError, Example, JobData
from lorafleet.executor.galore import GaLoreAdamW, galore_param_groups
from lorafleet.executor.model import load_base, packing_kwargs
from lorafleet.executor.optim import JobOptimizer, NonFiniteGradients
from lorafleet.scheduler.spec import ALL_LINEAR, Hyperparameters, check_method_format


@dataclass(frozen=True)
class GaloreSettings:
    """GaLore's own options (galore-torch's defaults); the rest of the job is its Hyperparameters."""

    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"  # memory.GALORE_PROJECTION_TYPES
    target_modules: tuple[str, ...] = (ALL_LINEAR,)  # the Linear layers whose weights are projected (PEFT's matching)


def load_trainable(path, dtype: str, device: str):
    """The model at `path` as a trainable copy of its own (every parameter requires grad; eval mode: no dropout)."""
    model, tokenizer = load_base(path, "none", dtype, device)
    model.requires_grad_(True)
    return model, tokenizer


def build_optimizer(model: torch.nn.Module, settings: GaloreSettings, hp: Hyperparameters,
                    total_steps: int) -> JobOptimizer:
    """GaLoreAdamW over the model's parameters (the targets projected), under the job's schedule and clipping."""
    groups = galore_param_groups(model, settings.target_modules)
    if not groups[1]["params"]:
        raise ValueError(f"GaLore target_modules {list(settings.target_modules)}: no Linear layer of the model matches")
    galore = GaLoreAdamW(groups, lr=hp.learning_rate, betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_epsilon,
                         weight_decay=hp.weight_decay, rank=settings.rank, update_proj_gap=settings.update_proj_gap,
                         scale=settings.scale, proj_type=settings.proj_type)
    return JobOptimizer(groups, hp, total_steps, optimizer=galore)


class GaloreJob:
    """One GaLore job on one executor. Raises ValueError for unusable settings or a preference dataset, DataError for
    unreadable data, FileNotFoundError/ValueError for an unusable `resume_from`."""

    def __init__(self, base_model_path, settings: GaloreSettings, hp: Hyperparameters, dataset_path,
                 dataset_format: str = "auto", dtype: str = "auto", device: str = "cpu",
                 dataset_name: str | None = None, resume_from=None):
        self.settings, self.hp = settings, hp
        # resuming loads the checkpoint's weights (an export of this job) instead of the base's
        self.model, self.tokenizer = load_trainable(resume_from or base_model_path, dtype, device)
        self.device = self.model.device
        self.data = JobData(dataset_path, dataset_format, self.tokenizer, hp.max_seq_len, hp.batch_size, hp.seed,
                            name=dataset_name)
        check_method_format("sft", self.data.fmt, self.data.name)
        self.micro_batch_limit, self.total_steps = run_length(hp, self.data.steps_per_epoch)
        self.optimizer = build_optimizer(self.model, settings, hp, self.total_steps)
        self.steps_done = 0  # optimizer steps
        self.micro_batches = 0
        self.accumulated = 0  # micro-batches in the window under way
        self.window_targets = 0  # their target tokens
        self.trained_tokens = 0
        self.last_input_tokens = 0  # of the last micro-batch, all its passes (what a step's throughput counts)
        self.largest_pass_tokens = self.pass_input_tokens = 0  # of its largest pass; of the last forward
        self.done = False
        self.error: str | None = None
        if resume_from is not None:
            self._restore(load_galore_state(resume_from, self._identity()))

    @property
    def active(self) -> bool:
        return not self.done and self.error is None

    @property
    def window_size(self) -> int:
        """Micro-batches in the window under way: the accumulation, or fewer in the last window of the run."""
        accumulation = self.hp.gradient_accumulation_steps
        return min(accumulation, self.micro_batch_limit - (self.micro_batches - self.accumulated))

    def step(self, max_pass_tokens: int | None = None) -> StepResult:
        """Train on the next micro-batch, in passes of at most `max_pass_tokens` tokens (whole sequences; None: one
        pass), and step the optimizer when its window is full."""
        if not self.active:
            raise RuntimeError(self.error or "the GaLore job is done")
        try:
            examples, _epoch = self.data.next_batch()
        except DataError as exc:
            return self._fail(f"data error at step {self.steps_done + 1}: {exc}")
        tokens = sum(example.num_targets for example in examples)
        loss, self.last_input_tokens, self.largest_pass_tokens = None, 0, 0
        if tokens:  # a micro-batch whose targets were all truncated away teaches nothing: no forward
            loss = self._train_passes(examples, tokens, max_pass_tokens) / tokens
            self.data.read_ahead()  # while the last pass's backward runs on the GPU (JobData's docstring)
            if not math.isfinite(loss):
                return self._fail(f"loss is {loss} at step {self.steps_done + 1}")
        self.micro_batches += 1
        self.accumulated += 1
        self.window_targets += tokens
        self.trained_tokens += tokens
        if self.accumulated < self.hp.gradient_accumulation_steps and self.micro_batches < self.micro_batch_limit:
            return self._result(loss, tokens)
        return self._end_window(loss, tokens)

    def _train_passes(self, examples: list[Example], tokens: int, max_pass_tokens: int | None) -> float:
        """Forward and backward of the micro-batch's passes, each pass's loss divided as the whole micro-batch's, so
        their gradients add up to one pass's. The summed loss; a pass whose loss is not finite stops it unstepped
        (its caller fails the job and drops the window's gradients)."""
        total = 0.0
        for part in split_passes({"job": examples}, max_pass_tokens):
            loss_sum = self.loss_sum(part["job"])
            self.largest_pass_tokens = max(self.largest_pass_tokens, self.pass_input_tokens)
            self.last_input_tokens += self.pass_input_tokens
            total += loss_sum.item()
            if not math.isfinite(total):
                return total
            (loss_sum / (tokens * self.window_size)).backward()
        return total

    def loss_sum(self, examples: list[Example]) -> torch.Tensor:
        """The cross-entropy summed over the micro-batch's target tokens, its sequences packed in one row."""
        batch = pack({"job": examples}, self.device)
        self.pass_input_tokens = batch.input_ids.numel()
        kwargs = packing_kwargs(batch.sequence_lengths, self.device)
        logits = self.model(batch.input_ids, use_cache=False, **kwargs).logits[0]
        return F.cross_entropy(logits.float(), batch.targets, ignore_index=IGNORE_INDEX, reduction="sum")

    def _end_window(self, loss: float | None, tokens: int) -> StepResult:
        lr, grad_norm = self.optimizer.lr, None
        if self.window_targets == 0:
            # Nothing to learn from: the weights stay (AdamW would still move them by momentum and weight decay);
            # the step still counts toward the schedule and max_steps, as in a LoRA job.
            self.optimizer.skip_update()
        else:
            norm = self.optimizer.grad_norm()
            grad_norm = norm.item()
            try:
                self.optimizer.step(norm, grad_norm)
            except NonFiniteGradients as exc:
                return self._fail(f"{exc} at step {self.steps_done + 1}", loss, tokens)
        self.steps_done += 1
        self.accumulated = self.window_targets = 0
        self.done = self.steps_done >= self.total_steps
        result = self._result(loss, tokens, grad_norm, lr)
        result.checkpoint_due = self.done or self.steps_done % self.hp.checkpoint_every == 0
        return result

    def _result(self, loss=None, tokens=0, grad_norm=None, lr=None) -> StepResult:
        lr = self.optimizer.lr if lr is None else lr
        return StepResult(loss, tokens, lr, grad_norm, self.steps_done, self.total_steps, self.done, self.error)

    def _fail(self, error: str, loss=None, tokens=0) -> StepResult:
        """Fail the job before its weights change: the window's gradients are dropped, the optimizer never steps."""
        self.error = f"GaLore job failed: {error}"
        self.optimizer.zero_grad()
        return self._result(loss, tokens)

    @torch.no_grad()
    def logits(self, input_ids: list[int]) -> torch.Tensor:
        """Next-token logits [T, vocab] of one sequence through the trained model."""
        kwargs = packing_kwargs([len(input_ids)], self.device)
        return self.model(torch.tensor([input_ids], device=self.device), use_cache=False, **kwargs).logits[0]

    def export(self, directory) -> Path:
        """The trained model as a full Hugging Face model directory (weights in the compute dtype, config, the base's
        tokenizer) that `AutoModelForCausalLM.from_pretrained` loads; return it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return directory

    def checkpoint(self, directory) -> Path:
        """`export`, plus the training state to resume from, into `directory`; return it."""
        directory = self.export(directory)
        save_training_state(directory, {
            "galore_job": self._identity(),
            "step": self.steps_done,
            "micro_batches": self.micro_batches,
            "accumulated": self.accumulated,
            "window_targets": self.window_targets,
            "trained_tokens": self.trained_tokens,
            "pending_grads": [None if p.grad is None else p.grad.detach().clone() for p in self.optimizer.params],
            "optimizer": self.optimizer.state_dict(),
            "data": self.data.state_dict(),
        })
        return directory

    def _identity(self) -> str:
        """What a checkpoint must have been saved with to resume this run: the settings, the hyperparameters and the
        compute dtype."""
        return json.dumps({"settings": asdict(self.settings), "hyperparameters": self.hp.model_dump(mode="json"),
                           "dtype": str(self.model.dtype)}, sort_keys=True)

    def _restore(self, state: dict) -> None:
        self.steps_done, self.micro_batches = state["step"], state["micro_batches"]
        self.accumulated, self.window_targets = state["accumulated"], state["window_targets"]
        self.trained_tokens = state["trained_tokens"]
        self.done = self.steps_done >= self.total_steps
        for param, grad in zip(self.optimizer.params, state["pending_grads"], strict=True):
            param.grad = None if grad is None else grad.to(param.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.data.load_state_dict(state["data"])


def load_galore_state(directory, identity: str) -> dict:
    """A GaLore job's training state, refusing one saved for other settings, hyperparameters or dtype (it would not
    resume the same run) or one of a LoRA job."""
    path, state = read_training_state(directory)
    if "galore_job" not in state:
        raise ValueError(f"cannot resume: {path} is not a GaLore job's state")
    if state["galore_job"] != identity:
        raise ValueError(f"cannot resume: {path} was saved with other GaLore settings, hyperparameters or dtype")
    return state
