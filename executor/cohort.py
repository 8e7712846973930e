"""The cohort: one frozen base, many jobs, one forward and one backward per step.

Each step every active job draws its own micro-batch; all their sequences are packed back to back into one row
(no padding; attention stays within each sequence; positions restart per sequence). Every job's loss is the mean
over its own target tokens, exactly what training it alone computes; the cohort loss is their sum, so one backward
gives every job the gradient it would get alone. Then each job's own optimizer steps (when its gradient
accumulation is full), clipped by its own norm.

With `max_pass_tokens` a step runs as several passes (forward + backward) over consecutive groups of whole sequences,
each at most that many tokens (a longer sequence goes alone). Each job's loss is still divided by its target count
over the whole step, so the summed gradients are the one-pass gradients; only the activations of one pass are held
at a time. That fits large cohorts without recomputing activations. (With dropout each pass draws its own seed per job,
so the masks differ from one pass's: same distribution, other numbers.)

DPO jobs (`method: dpo`) train on preference pairs beside SFT jobs in the same packed row: a pair is two sequences
(chosen, rejected) kept in one pass, and its loss is sigmoid DPO, -log σ(β((π_c - ref_c) - (π_r - ref_r))), the
log-probs summed over the answer tokens, averaged over the micro-batch's pairs. The reference is the frozen base
itself: before each pass that holds DPO pairs, one no-grad forward of those pairs' rows with no adapter routed
(`RowRouting.segments` empty) gives ref_c and ref_r, so a DPO job needs no second model in memory. Its cost is one
extra forward (no backward, no activations kept) over the DPO jobs' tokens each step, about a third more compute
for those tokens; the reference of a pair is computed again each epoch rather than stored.

SimPO jobs (`method: simpo`) train on the same pairs, reference-free: -log σ(β(π_c/|y_c| - π_r/|y_r|) - γ), each
answer's log-prob averaged over its target tokens. No reference forward, so a SimPO job costs what an SFT job on the
same tokens costs, about a quarter less compute than DPO on them.

ORPO jobs (`method: orpo`), reference-free too: the chosen sequence's NLL (over its prompt and answer, as TRL's
ORPOTrainer computes it: a mean over the micro-batch's chosen tokens) minus β log σ(log odds_c - log odds_r), the
odds of each answer's average probability p being p / (1 - p). Their chosen sequences' prompt rows are targeted too
(`Cohort._target_chosen_prompts`); the log-probs of the odds cover the answer rows only.

On a GPU a one-pass step of plain LoRA SFT jobs runs as a CUDA graph once its layout repeats (executor/step_graph.py):
its forward and backward replayed by one launch instead of thousands, for the same numbers within bf16 rounding.

LoPA jobs (`adapter.type: lopa`, executor/lopa.py) adapt no layer: a pass that holds one feeds the base token
embeddings instead of ids, each LoPA sequence with its own m soft-prompt rows before it (positions restarting with
the prompt, no target on it), every other job's rows unchanged; the layers' routing follows the rows to where they
moved, and the prompt rows are dropped from the token losses, so everything after sees the pass's own rows
(`Cohort._prompted_token_losses`). Such passes run eagerly.

A job whose data fails, or whose loss or gradient norm is not finite, is failed alone: its adapter is detached before
its weights change, and nothing of it can reach the other jobs (their rows never meet its rows: attention is per
sequence, everything else is per row). A finished job reports done=True and stops drawing batches; the executor
checkpoints and removes it.

    cohort = Cohort("/models/llama", quantization="none", dtype="auto", device="cpu")
    cohort.add_job("job-1", spec, "/data/job-1.jsonl")
    while cohort.active_jobs():
        results = cohort.step()          # job id -> StepResult
    cohort.checkpoint("job-1", "/ckpt/job-1")
    cohort.remove_job("job-1")
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafleet.executor.activations import checkpoint_layers
from lorafleet.executor.adapters import Adapter, build_adapter
from lorafleet.executor.checkpoint import (HostCopy, JobSnapshot, load_training_state, peft_adapter_files,
                                           peft_tensors)
from lorafleet.executor.data import IGNORE_INDEX, DataError, Example, JobData
from lorafleet.executor.experts import MultiLoraExperts, attach_expert_factors, wrap_expert_targets
from lorafleet.executor.fused_decoder import fuse_decoder
from lorafleet.executor.loss import chunked_head_loss_applies, logit_softcap
from lorafleet.executor.loss import token_losses as chunked_token_losses
from lorafleet.executor.lopa import LopaAdapter, input_length, lopa_files, lopa_logits, lopa_tensors, prompt_pass
from lorafleet.executor.model import decoder_layers, load_base, packing_kwargs
from lorafleet.executor.multilora import MultiLoraLinear, RowRouting, is_conv1d, wrap_targets
from lorafleet.executor.optim import JobOptimizer, NonFiniteGradients
from lorafleet.executor.step_graph import StepGraphs
from lorafleet.scheduler.spec import PREFERENCE_METHODS, Hyperparameters, JobSpec, check_method_format


@dataclass
class StepResult:
    loss: float | None  # mean over this micro-batch's target tokens; None if it had none or the job failed first
    tokens: int  # target tokens the loss averaged over
    lr: float
    grad_norm: float | None  # pre-clip norm, set on the steps where the optimizer stepped
    step: int  # optimizer steps done
    total_steps: int
    done: bool
    error: str | None = None
    checkpoint_due: bool = False  # the optimizer just reached a multiple of checkpoint_every, or the end
    rewards: PreferenceRewards | None = None  # a preference (DPO, SimPO, ORPO) job's, over this micro-batch's pairs


@dataclass
class PreferenceRewards:
    """A preference micro-batch's implicit rewards, averaged over its pairs (TRL's rewards/* metrics): DPO's
    β(log π - log ref), SimPO's and ORPO's β·log π / |y| (TRL's CPOTrainer's with loss_type simpo, ORPOTrainer's)."""

    chosen: float
    rejected: float
    accuracy: float  # the share of pairs whose chosen reward beats the rejected one

    @property
    def margin(self) -> float:
        return self.chosen - self.rejected

    def metrics(self) -> dict[str, float]:
        return {"rewards_chosen": self.chosen, "rewards_rejected": self.rejected, "reward_margin": self.margin,
                "reward_accuracy": self.accuracy}


@dataclass
class Job:
    job_id: str
    spec: JobSpec
    adapter: Adapter
    layers: list[MultiLoraLinear | MultiLoraExperts]
    optimizer: JobOptimizer
    data: JobData
    micro_batch_limit: int
    total_steps: int
    step: int = 0
    micro_batches: int = 0
    accumulated: int = 0
    window_targets: int = 0  # target tokens in the micro-batches of the window under way
    trained_tokens: int = 0  # target tokens trained on since the job began, across resumes (OpenAI's trained_tokens)
    done: bool = False
    error: str | None = None
    pinned_ahead: bool = False  # its checkpoints' host memory (`Cohort._pin_ahead`)

    @property
    def active(self) -> bool:
        return not self.done and self.error is None

    @property
    def accumulation(self) -> int:
        return self.spec.hyperparameters.gradient_accumulation_steps

    @property
    def window_size(self) -> int:
        """Micro-batches in the window under way: the accumulation, or fewer in the last window of the run."""
        return min(self.accumulation, self.micro_batch_limit - (self.micro_batches - self.accumulated))

    @property
    def window_full(self) -> bool:
        """Whether the optimizer steps now: its accumulation is complete, or the last micro-batch is done."""
        return self.accumulated >= self.accumulation or self.micro_batches >= self.micro_batch_limit

    def result(self, loss=None, tokens=0, grad_norm=None, lr=None) -> StepResult:
        lr = self.optimizer.lr if lr is None else lr
        return StepResult(loss, tokens, lr, grad_norm, self.step, self.total_steps, self.done, self.error)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, T]
    targets: torch.Tensor  # [T], the token each position predicts; IGNORE_INDEX at the end of every sequence
    sequence_lengths: list[int]
    rows: dict[str, tuple[int, int]]  # job id -> its rows
    num_targets: dict[str, int]
    job_sequences: dict[str, list[int]]  # job id -> the lengths of its sequences, in order (a pair: chosen, rejected)
    references: dict[str, torch.Tensor] = field(default_factory=dict)  # DPO job -> its sequences' log-probs, base alone
    packing: dict | None = None  # the model's packing inputs when given (a CUDA graph's static ones), else formed
    rewards: dict[str, torch.Tensor] = field(default_factory=dict)  # pair job -> [Σ chosen, Σ rejected, pairs right]
    answers: dict[str, torch.Tensor] = field(default_factory=dict)  # ORPO job -> which of its rows are answer targets
    nll_weights: dict[str, float] = field(default_factory=dict)  # ORPO job -> pairs / chosen targets of its micro-batch
    input_lengths: dict[str, list[int]] = field(default_factory=dict)  # LoPA job -> its sequences' input rows


def run_length(hp: Hyperparameters, steps_per_epoch: int) -> tuple[int, int]:
    """(micro-batches, optimizer steps) a job runs: max_steps windows, else its epochs over the data; the last
    window may be shorter."""
    if hp.max_steps is not None:
        micro_batch_limit = hp.max_steps * hp.gradient_accumulation_steps
    else:
        micro_batch_limit = steps_per_epoch * hp.epochs
    return micro_batch_limit, math.ceil(micro_batch_limit / hp.gradient_accumulation_steps)


def split_passes(batches: dict[str, list[Example]], max_tokens: int | None,
                 prompt_rows: dict[str, int] | None = None) -> list[dict[str, list[Example]]]:
    """Consecutive groups of whole sequences of at most `max_tokens` tokens each (None: one group of everything),
    as even as whole sequences allow: as many groups as `max_tokens` needs, each closed once it reaches an equal
    share, so no short last pass pays a whole pass's host time for a few tokens. `prompt_rows`: job -> the rows
    prepended to each of its sequences (a LoPA job's m), which count as its tokens."""
    prompt_rows = prompt_rows or {}
    total = sum(example_rows(example, prompt_rows.get(job_id, 0))
                for job_id, examples in batches.items() for example in examples)
    share = -(-total // -(-total // max_tokens)) if max_tokens is not None and total else None
    passes, current, size = [], {}, 0
    for job_id, examples in batches.items():
        for example in examples:
            length = example_rows(example, prompt_rows.get(job_id, 0))
            if not length:
                continue
            if share is not None and current and (size + length > max_tokens or size >= share):
                passes.append(current)
                current, size = {}, 0
            current.setdefault(job_id, []).append(example)
            size += length
    if current:
        passes.append(current)
    return passes


def example_rows(example: Example, prompt_rows: int = 0) -> int:
    """The rows an example takes in the packed row: its tokens, and `prompt_rows` before each of its sequences."""
    return len(example.input_ids) + prompt_rows * len(example.sequences())


def joined_micro_batches(data: JobData, budget: int, prompt_rows: int = 0):
    """One epoch of `data`'s micro-batches (a validation pass), consecutive ones joined while their rows stay within
    `budget` (0: each apart; one larger than it alone). An eager forward of one micro-batch is host-bound (1B, 4x512 on
    an H100: 33-39 ms, of GPU work about 6), and a forward without gradients of a training pass's tokens holds less
    memory than that pass did: the budget is the largest training pass's tokens."""
    group, tokens = [], 0
    for _ in range(data.steps_per_epoch):
        examples, _epoch = data.next_batch()
        size = sum(example_rows(example, prompt_rows) for example in examples)
        if group and tokens + size > budget:
            yield group
            group, tokens = [], 0
        group, tokens = group + examples, tokens + size
    if group:
        yield group


def pack(batches: dict[str, list[Example]], device, pad_rows=None) -> PackedBatch:
    """Lay every job's sequences back to back; targets are shifted within each sequence, never across two.

    pad_rows: rows -> padded rows; each job's rows are then padded to it by one more sequence (token 0) without
    targets, inside the job's rows (a CUDA graph's fixed layout)."""
    # int64 arrays, not lists: extending and counting run in C, and the tensors are one copy of their buffers
    # (host time: a 16k-token cohort packed in ~1 ms instead of ~5)
    ids, targets, lengths, rows, num_targets, job_sequences = array("q"), array("q"), [], {}, {}, {}
    for job_id, examples in batches.items():
        start = len(ids)
        job_sequences[job_id] = []
        for example in examples:
            for begin, end in example.sequences():
                ids.extend(example.input_ids[begin:end])
                targets.extend(example.labels[begin + 1:end])
                targets.append(IGNORE_INDEX)
                lengths.append(end - begin)
                job_sequences[job_id].append(end - begin)
        padding = pad_rows(len(ids) - start) - (len(ids) - start) if pad_rows else 0
        if padding:
            ids.extend([0] * padding)
            targets.extend([IGNORE_INDEX] * padding)
            lengths.append(padding)
        rows[job_id] = (start, len(ids))
        num_targets[job_id] = len(targets) - start - targets[start:].count(IGNORE_INDEX)
    return PackedBatch(_int64_tensor(ids, device).view(1, -1), _int64_tensor(targets, device), lengths, rows,
                       num_targets, job_sequences)


def _int64_tensor(values: array, device) -> torch.Tensor:
    if not values:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.frombuffer(values, dtype=torch.int64).to(device, copy=True)


def sequence_logps(token_losses: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Each sequence's log-probability of its targets: minus the sum of its rows' token losses (0 off target)."""
    return -torch.stack([part.sum() for part in token_losses.split(lengths)])


def sequence_target_counts(is_target: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Each sequence's number of target tokens, from a mask of the rows whose target counts."""
    return torch.stack([part.sum() for part in is_target.split(lengths)])


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, without cancellation on either side of -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_rewards(rewards: torch.Tensor) -> torch.Tensor:
    """[Σ chosen, Σ rejected, pairs whose chosen reward is higher] of per-pair rewards [pairs, 2] (no gradient)."""
    right = (rewards[:, 0] > rewards[:, 1]).to(rewards.dtype)
    return torch.stack([rewards[:, 0].sum(), rewards[:, 1].sum(), right.sum()])


def dpo_losses(logps: torch.Tensor, references: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid DPO over pairs laid out (chosen, rejected, chosen, ...): the per-pair losses, and their rewards
    β(log π - log ref) (`pair_rewards`)."""
    log_ratios = (logps - references).view(-1, 2)
    losses = -F.logsigmoid(beta * (log_ratios[:, 0] - log_ratios[:, 1]))
    return losses, pair_rewards(beta * log_ratios.detach())


def simpo_losses(logps: torch.Tensor, target_counts: torch.Tensor, beta: float,
                 gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SimPO over pairs laid out as for `dpo_losses`: -log σ(β(avg_c - avg_r) - γ), avg = the answer's log-prob over
    its target count; the per-pair losses, and their rewards β·avg (`pair_rewards`). Reference-free: no reference
    log-probs, so no reference forward. An answer truncated to no target counts as average 0 rather than 0/0."""
    averages = (logps / target_counts.clamp(min=1)).view(-1, 2)
    losses = -F.logsigmoid(beta * (averages[:, 0] - averages[:, 1]) - gamma)
    return losses, pair_rewards(beta * averages.detach())


def orpo_losses(logps: torch.Tensor, target_counts: torch.Tensor, chosen_nll: torch.Tensor, beta: float,
                nll_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO over pairs laid out as for `dpo_losses`: nll_weight · chosen_nll - β log σ(log odds_c - log odds_r), the
    odds of an answer's average probability p = e^avg being p / (1 - p); the per-pair losses, and their rewards β·avg
    (`pair_rewards`). `chosen_nll` [pairs]: each chosen sequence's summed token losses. Reference-free."""
    averages = (logps / target_counts.clamp(min=1)).view(-1, 2)
    log_odds = (averages[:, 0] - averages[:, 1]) - (log1mexp(averages[:, 0]) - log1mexp(averages[:, 1]))
    losses = nll_weight * chosen_nll - beta * F.logsigmoid(log_odds)
    return losses, pair_rewards(beta * averages.detach())


@dataclass
class _StepSums:
    """What a step's passes add up per job, kept on the device until the step's one host sync."""

    loss: dict[str, torch.Tensor]
    rewards: dict[str, torch.Tensor]  # preference jobs: chosen, rejected reward and accuracy sums
    non_finite: dict[str, float] = field(default_factory=dict)  # job id -> its non-finite loss

    @classmethod
    def zeros(cls, batches: dict, is_preference, device: torch.device) -> "_StepSums":
        """Every job's sums as views of one zeroed tensor: one allocation and one kernel a step, not two per job."""
        preference = [job_id for job_id in batches if is_preference(job_id)]
        flat = torch.zeros(len(batches) + 3 * len(preference), device=device)
        losses, rewards = flat.split([len(batches), 3 * len(preference)])
        return cls(dict(zip(batches, losses.unbind())), dict(zip(preference, rewards.view(-1, 3).unbind())))


@dataclass
class _SyncedStep:
    """A step's numbers on the host: losses, (norm tensor, norm) of the jobs that stepped, preference rewards."""

    losses: dict[str, float]
    norms: dict[str, tuple[torch.Tensor, float]]
    rewards: dict[str, PreferenceRewards]


class Cohort:
    def __init__(
        self,
        base_model_path,
        quantization: str = "none",
        dtype: str = "auto",
        device: str = "cpu",
        activation_checkpointing: int = 0,
        max_pass_tokens: int | None = None,
        cuda_graphs: bool = True,
    ):
        if max_pass_tokens is not None and max_pass_tokens < 1:
            raise ValueError(f"max_pass_tokens {max_pass_tokens!r}: expected a positive number of tokens or None")
        self.max_pass_tokens = max_pass_tokens
        self.step_tokens, self.largest_pass_tokens = 0, 0  # input tokens of the last step, and of its largest pass
        self.base_model_path = str(base_model_path)
        self.quantization, self.dtype = quantization, dtype
        self.model, self.tokenizer = load_base(base_model_path, quantization, dtype, device)
        self.device = self.model.device
        fuse_decoder(self.model)
        self.routing = RowRouting()
        self.jobs: dict[str, Job] = {}
        # on a GPU, a step's forward and backward replayed as one CUDA graph where it can be (executor/step_graph.py)
        self.graphs = StepGraphs(enabled=cuda_graphs)
        # checkpointing every n-th decoder layer (1: all) fits larger cohorts for 1/n of a layer's recomputation
        checkpoint_layers(decoder_layers(self.model), self.routing, activation_checkpointing)

    def active_jobs(self) -> list[str]:
        return [job_id for job_id, job in self.jobs.items() if job.active]

    def add_job(self, job_id: str, spec: JobSpec, dataset_path, resume_from: Path | None = None,
                dataset_name: str | None = None) -> None:
        """Attach a new adapter (PEFT's init from the job's seed, or the state in `resume_from`) between steps.

        Raises ValueError for a job that cannot share this base (or an unknown target module), DataError for
        unreadable data, FileNotFoundError/ValueError for an unusable `resume_from`.
        """
        if job_id in self.jobs:
            raise ValueError(f"job {job_id!r} is already in this cohort")
        if (spec.quantization, spec.dtype) != (self.quantization, self.dtype):
            raise ValueError(
                f"job {job_id!r} wants quantization={spec.quantization} dtype={spec.dtype}; this cohort runs "
                f"quantization={self.quantization} dtype={self.dtype}"
            )
        hp = spec.hyperparameters
        data = JobData(dataset_path, spec.dataset_format, self.tokenizer, hp.max_seq_len, hp.batch_size, hp.seed,
                       name=dataset_name)
        check_method_format(spec.method, data.fmt, f"job {job_id!r}: {data.name}")
        if spec.adapter.type == "lopa":  # no layer of the base touched: its prompts enter with the input embeddings
            adapter, layers = LopaAdapter(spec.adapter, self.model.get_input_embeddings().embedding_dim, hp.seed), []
        else:
            adapter, layers = self._layer_adapter(spec)
        adapter = adapter.to(self.device)
        adapter.place_dropout_rng(self.device)
        micro_batch_limit, total_steps = run_length(hp, data.steps_per_epoch)
        optimizer = JobOptimizer(adapter.param_groups(hp.learning_rate), hp, total_steps)
        job = Job(job_id, spec, adapter, layers, optimizer, data, micro_batch_limit, total_steps)
        if resume_from is not None:
            self._restore(job, load_training_state(resume_from, spec))
        for layer in job.layers:
            layer.adapters[job_id] = adapter
        self.jobs[job_id] = job

    def _layer_adapter(self, spec: JobSpec) -> tuple[Adapter, list[MultiLoraLinear | MultiLoraExperts]]:
        """A LoRA-kind job's adapter (PEFT's init from its seed) and the multi-adapter layers it targets, wrapped."""
        layers = wrap_targets(self.model, spec.adapter.target_modules, self.routing)
        shapes = {name: (layer.in_features, layer.out_features) for name, layer in layers.items()}
        base_weights = {name: layer.base_weight() for name, layer in layers.items()} if spec.adapter.use_dora else None
        expert_layers = wrap_expert_targets(self.model, spec.adapter.target_parameters, self.routing)
        adapter = build_adapter(spec.adapter, shapes, spec.hyperparameters.seed, base_weights)
        attach_expert_factors(adapter, expert_layers, spec.hyperparameters.seed)
        return adapter, [*layers.values(), *dict.fromkeys(expert_layers.values())]

    def prompt_rows(self) -> dict[str, int]:
        """Job id -> the soft-prompt rows before each of its sequences, for the LoPA jobs (executor/lopa.py)."""
        return {job_id: job.adapter.prompt.num_virtual_tokens for job_id, job in self.jobs.items()
                if isinstance(job.adapter, LopaAdapter)}

    def remove_job(self, job_id: str) -> None:
        """Detach a job's adapter (done, cancelled or failed); the base and the other jobs are untouched."""
        if job_id not in self.jobs:
            raise KeyError(f"no job {job_id!r} in this cohort")
        self._detach(self.jobs.pop(job_id))
        self.graphs.forget(job_id)

    def step(self) -> dict[str, StepResult]:
        """One cohort step: each active job contributes one micro-batch; returns job id -> StepResult."""
        results, batches = self._next_batches()
        if not batches:
            return results
        targets = {job_id: sum(example.num_targets for example in examples) for job_id, examples in batches.items()}
        # SFT: the mean over target tokens; DPO, SimPO, ORPO: the mean over pairs
        divisors = {job_id: len(examples) if self._is_preference(job_id) else targets[job_id]
                    for job_id, examples in batches.items()}
        sums = _StepSums.zeros(batches, self._is_preference, self.device)
        graphed = self._run_passes(batches, divisors, sums)
        finished = [job_id for job_id in batches if job_id not in sums.non_finite]
        for job_id in finished:
            job = self.jobs[job_id]
            job.micro_batches += 1
            job.accumulated += 1
            job.window_targets += targets[job_id]
            job.trained_tokens += targets[job_id]
        synced = self._step_optimizers_and_sync(finished, divisors, sums, graphed)
        for job_id in synced.norms:  # stepped: its state is now as its checkpoints will hold it
            self._pin_ahead(self.jobs[job_id])
        for job_id in batches:
            job = self.jobs[job_id]
            if job_id in sums.non_finite:
                results[job_id] = self._fail(job, f"loss is {sums.non_finite[job_id]} at step {job.step + 1}")
            else:
                results[job_id] = self._after_backward(job, synced.losses[job_id], targets[job_id],
                                                       synced.norms.get(job_id))
                results[job_id].rewards = synced.rewards.get(job_id)
        return results

    def _next_batches(self) -> tuple[dict[str, StepResult], dict[str, list]]:
        """Each active job's next micro-batch; a job whose data fails is failed here (its result returned)."""
        results, batches = {}, {}
        for job in [job for job in self.jobs.values() if job.active]:
            try:
                batches[job.job_id], _epoch = job.data.next_batch()
            except DataError as exc:
                results[job.job_id] = self._fail(job, f"data error at step {job.step + 1}: {exc}")
        return results, batches

    def _run_passes(self, batches: dict[str, list], divisors: dict[str, int], sums: "_StepSums") -> bool:
        """Forward and backward of the step's passes (under `max_pass_tokens`), replayed from CUDA graphs while
        they serve; True when every pass was replayed (a non-finite loss is then found at the step's sync)."""
        self.step_tokens, self.largest_pass_tokens = 0, 0
        prompt_rows = self.prompt_rows()
        passes = split_passes(batches, self.max_pass_tokens, prompt_rows)
        graphed = self.graphs.use(self, passes)
        for part in passes:
            part = {job_id: examples for job_id, examples in part.items() if job_id not in sums.non_finite}
            if not part:
                continue
            part_tokens = sum(example_rows(example, prompt_rows.get(job_id, 0))
                              for job_id, examples in part.items() for example in examples)
            self.step_tokens += part_tokens
            self.largest_pass_tokens = max(self.largest_pass_tokens, part_tokens)
            weights = {job_id: 1.0 / (max(1, divisors[job_id]) * self.jobs[job_id].window_size) for job_id in part}
            replayed = self.graphs.run(self, part, weights) if graphed else None
            if replayed is not None:
                for job_id, loss_sum in replayed.items():
                    sums.loss[job_id] += loss_sum.detach()
                continue
            graphed = False
            self._eager_pass(part, batches, divisors, sums)
        return graphed

    def _eager_pass(self, part: dict[str, list], batches: dict[str, list], divisors: dict[str, int],
                    sums: "_StepSums") -> None:
        """One packed forward and one backward for all of the pass's jobs whose loss is finite; each job's loss
        reaches only its own adapter."""
        batch = self._pack(part, batches)
        pass_sums = self._forward(batch)
        for job_id, rewards in batch.rewards.items():
            sums.rewards[job_id] += rewards
        finite = torch.isfinite(torch.stack(list(pass_sums.values()))).tolist()
        live = {}
        for (job_id, loss_sum), ok in zip(pass_sums.items(), finite):
            if ok:
                live[job_id] = loss_sum
            else:
                sums.non_finite[job_id] = loss_sum.item()
        if live:
            job_losses = (loss_sum / max(1, divisors[job_id]) for job_id, loss_sum in live.items())
            sum(loss / self.jobs[job_id].window_size for job_id, loss in zip(live, job_losses)).backward()
        for job_id, loss_sum in live.items():
            sums.loss[job_id] += loss_sum.detach()

    def _step_optimizers_and_sync(self, finished: list[str], divisors: dict[str, int], sums: "_StepSums",
                                  graphed: bool) -> "_SyncedStep":
        """Launch the update of every job whose window is full, then one host sync for the step: every job's loss,
        those jobs' gradient norms, and the preference jobs' rewards."""
        stepping = [job_id for job_id in finished if self.jobs[job_id].window_full]
        norms = [self.jobs[job_id].optimizer.grad_norm() for job_id in stepping]
        for job_id, norm in zip(stepping, norms):  # on a GPU the updates queue behind the step's work before the sync
            if self.jobs[job_id].window_targets:
                self.jobs[job_id].optimizer.launch_step(norm, sums.loss[job_id])
        losses = [sums.loss[job_id] / max(1, divisors[job_id]) for job_id in finished]
        rewarded = [job_id for job_id in finished if job_id in sums.rewards]  # preference jobs: 3 numbers each
        rewards = [sums.rewards[job_id] / divisors[job_id] for job_id in rewarded]
        self._read_ahead()
        self._pack_ahead()
        numbers = torch.cat([torch.stack(losses + norms), *rewards]).tolist() if finished else []
        loss_values = dict(zip(finished, numbers))
        if graphed:  # its backward ran whatever the losses: a job whose loss is not finite fails here, unstepped
            sums.non_finite.update({job_id: loss for job_id, loss in loss_values.items() if not math.isfinite(loss)})
        reward_rows = numbers[len(finished) + len(norms):]
        return _SyncedStep(
            losses=loss_values,
            norms=dict(zip(stepping, zip(norms, numbers[len(finished):]))),
            rewards={job_id: PreferenceRewards(*reward_rows[3 * i:3 * i + 3]) for i, job_id in enumerate(rewarded)})

    def _read_ahead(self) -> None:
        """Each active job's next micro-batch, read and tokenised while the GPU still runs this step (on a GPU the
        host is ahead until the step's sync): first-epoch records of 8 jobs cost a 1B 8 x 4x512 step 24 ms, 13%, when
        read at its start (docs/BENCHMARKS.md, run H13)."""
        for job in self.jobs.values():
            if job.active:
                job.data.read_ahead()

    def _pack_ahead(self) -> None:
        """While a graph is held: the next step's pass packed for it from every active job's micro-batch read ahead,
        while the GPU still runs this step (`StepGraphs.pack_ahead`; a step whose pass differs packs its own)."""
        if self.graphs.captured is None:
            return
        upcoming = {}
        for job in [job for job in self.jobs.values() if job.active]:
            micro_batch = job.data.peek()
            if micro_batch is None:  # not read, or its read failed: that step packs its own
                return
            upcoming[job.job_id] = micro_batch
        passes = split_passes(upcoming, self.max_pass_tokens, self.prompt_rows())  # as `_run_passes` will split them
        if len(passes) == 1:  # a graph serves one-pass steps only
            self.graphs.pack_ahead(passes[0])

    def _is_preference(self, job_id: str) -> bool:
        return self.jobs[job_id].spec.method in PREFERENCE_METHODS

    def _pack(self, batches: dict[str, list[Example]], micro_batches: dict[str, list[Example]]) -> PackedBatch:
        """`pack`, with the reference log-probs of the DPO jobs' sequences in it (SimPO and ORPO need none), and the
        ORPO jobs' chosen prompts targeted; `micro_batches`: the jobs' whole micro-batches this is a pass of."""
        batch = pack(batches, self.device)
        pairs = {job_id: examples for job_id, examples in batches.items() if self.jobs[job_id].spec.method == "dpo"}
        if pairs:
            batch.references = self._reference_logps(pack(pairs, self.device))
        for job_id, examples in batches.items():
            if self.jobs[job_id].spec.method == "orpo":
                self._target_chosen_prompts(batch, job_id, examples, micro_batches[job_id])
            if isinstance(self.jobs[job_id].adapter, LopaAdapter):
                batch.input_lengths[job_id] = [input_length(example.labels[begin:end])
                                               for example in examples for begin, end in example.sequences()]
        return batch

    def _target_chosen_prompts(self, batch: PackedBatch, job_id: str, examples: list[Example],
                               micro_batch: list[Example]) -> None:
        """ORPO's NLL covers each chosen sequence whole, its prompt included (TRL's ORPOTrainer): those rows get their
        next token as target, the answer rows are kept in `batch.answers` for the odds' log-probs, and the NLL's
        weight is the micro-batch's pairs over its chosen targets (a mean over those tokens, in a loss the step
        divides by the pairs)."""
        start, end = batch.rows[job_id]
        batch.answers[job_id] = batch.targets[start:end] != IGNORE_INDEX
        targets = []
        for example in examples:
            chosen = example.chosen_length
            targets += example.input_ids[1:chosen] + [IGNORE_INDEX] + example.labels[chosen + 1:] + [IGNORE_INDEX]
        batch.targets[start:end] = torch.tensor(targets, device=self.device)
        batch.nll_weights[job_id] = len(micro_batch) / max(1, sum(example.chosen_length - 1 for example in micro_batch))

    @torch.no_grad()
    def _reference_logps(self, batch: PackedBatch) -> dict[str, torch.Tensor]:
        """Job id -> the log-probs of its sequences through the frozen base alone: the rows are routed to no adapter."""
        self.routing.segments, self.routing.dropout_seeds = {}, None
        token_losses = self._token_losses(batch)
        return {job_id: sequence_logps(token_losses[start:end], batch.job_sequences[job_id])
                for job_id, (start, end) in batch.rows.items()}

    def _forward(self, batch: PackedBatch) -> dict[str, torch.Tensor]:
        """Job id -> the sum of its losses over its rows of the packed row: token losses (SFT) or pair losses (DPO,
        SimPO, ORPO: `_pair_losses`, whose rewards it puts in `batch.rewards`)."""
        self.routing.segments = batch.rows
        self.routing.dropout_seeds = self.dropout_seeds(batch)
        try:
            token_losses = self._token_losses(batch)
        finally:
            self.routing.segments, self.routing.dropout_seeds = {}, None
        sums = {}
        for job_id, (start, end) in batch.rows.items():
            if not self._is_preference(job_id):
                sums[job_id] = token_losses[start:end].sum()
                continue
            losses, batch.rewards[job_id] = self._pair_losses(job_id, batch, token_losses[start:end])
            sums[job_id] = losses.sum()
        return sums

    def _pair_losses(self, job_id: str, batch: PackedBatch,
                     token_losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A preference job's per-pair losses and rewards from its rows' token losses, by its method."""
        spec, (start, end) = self.jobs[job_id].spec, batch.rows[job_id]
        hp, lengths = spec.hyperparameters, batch.job_sequences[job_id]
        logps = sequence_logps(token_losses, lengths)
        if spec.method == "dpo":
            return dpo_losses(logps, batch.references[job_id], hp.beta)
        if spec.method == "simpo":
            target_counts = sequence_target_counts(batch.targets[start:end] != IGNORE_INDEX, lengths)
            return simpo_losses(logps, target_counts, hp.beta, hp.simpo_gamma)
        answers = batch.answers[job_id]  # ORPO: logps so far covered its chosen prompts too
        answer_logps = sequence_logps(token_losses * answers, lengths)
        return orpo_losses(answer_logps, sequence_target_counts(answers, lengths), -logps[0::2], hp.beta,
                           batch.nll_weights[job_id])

    def _token_losses(self, batch: PackedBatch) -> torch.Tensor:
        """The loss of every row of the packed row [T] (0 off target), with the routing set by the caller."""
        if batch.input_lengths:
            return self._prompted_token_losses(batch)
        kwargs = batch.packing or packing_kwargs(batch.sequence_lengths, self.device)
        return self._model_token_losses({"input_ids": batch.input_ids}, batch.targets, kwargs)

    def _prompted_token_losses(self, batch: PackedBatch) -> torch.Tensor:
        """`_token_losses` of a pass with LoPA jobs: the base is fed the token embeddings with each LoPA sequence's
        soft prompt prepended (`lopa.prompt_pass`: the other jobs' rows as they are), the routing follows every job's
        rows to where they moved, and the prompt rows' losses (no target: 0) are left out, so the result is in the
        batch's own rows. Eager only (a CUDA graph refuses LoPA jobs)."""
        embeds = self.model.get_input_embeddings()(batch.input_ids[0])
        prompts = {}
        for job_id, lengths in batch.input_lengths.items():
            start, end = batch.rows[job_id]
            prompts[job_id] = self.jobs[job_id].adapter.prompt.prompts(embeds[start:end], batch.job_sequences[job_id],
                                                                       lengths)
        prompted = prompt_pass(embeds, batch.targets, batch.rows, batch.job_sequences, prompts)
        self.routing.segments = {job_id: prompted.rows[job_id] for job_id in self.routing.segments}
        kwargs = packing_kwargs(prompted.sequence_lengths, self.device)
        losses = self._model_token_losses({"inputs_embeds": prompted.embeds[None]}, prompted.targets, kwargs)
        return losses.index_select(0, prompted.kept)

    def _model_token_losses(self, inputs: dict, targets: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Every row's loss [T] of the model run on `inputs` (input_ids or inputs_embeds, [1, T, ...])."""
        if chunked_head_loss_applies(self.model):
            hidden = self.model.base_model(**inputs, use_cache=False, **kwargs).last_hidden_state[0]
            return chunked_token_losses(hidden, self.model.lm_head.weight, targets, logit_softcap(self.model))
        logits = self.model(**inputs, use_cache=False, **kwargs).logits[0]
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")

    def dropout_seeds(self, batch: PackedBatch) -> torch.Tensor | None:
        """One fresh seed per job for this forward's dropout masks, from the job's own generator (0 for jobs that
        do not drop); None when none does."""
        adapters = [self.jobs[job_id].adapter for job_id in batch.rows]
        dropping = [adapter.dropout > 0 and adapter.training for adapter in adapters]
        if not any(dropping):
            return None
        no_seed = torch.zeros(1, dtype=torch.int64, device=self.device)
        return torch.cat([adapter.draw_dropout_seed().to(self.device) if drops else no_seed
                          for adapter, drops in zip(adapters, dropping)])

    def _after_backward(self, job: Job, loss: float, tokens: int, norm: tuple[torch.Tensor, float] | None) -> StepResult:
        """Step the job's optimizer when its accumulation window is full (`norm`: its gradient norm, and its value)."""
        loss = loss if tokens else None  # a micro-batch whose targets were all truncated away teaches nothing
        if norm is None:
            return job.result(loss, tokens)
        lr = job.optimizer.lr
        grad_norm = None
        if job.window_targets == 0:
            # Nothing to learn from, so the weights stay as they are (AdamW would still move them by its momentum
            # and weight decay); the step still counts toward the schedule and max_steps.
            job.optimizer.skip_update()
        else:
            grad_norm = norm[1]
            try:
                job.optimizer.step(*norm)
            except NonFiniteGradients as exc:
                return self._fail(job, f"{exc} at step {job.step + 1}", loss, tokens)
        job.step += 1
        job.accumulated = job.window_targets = 0
        job.done = job.step >= job.total_steps
        result = job.result(loss, tokens, grad_norm, lr)
        result.checkpoint_due = job.done or job.step % job.spec.hyperparameters.checkpoint_every == 0
        return result

    def _fail(self, job: Job, error: str, loss=None, tokens=0) -> StepResult:
        job.error = f"job {job.job_id} failed: {error}"
        job.optimizer.zero_grad()
        self._detach(job)
        return job.result(loss, tokens)

    def _detach(self, job: Job) -> None:
        for layer in job.layers:
            layer.adapters.pop(job.job_id, None)

    @torch.no_grad()
    def logits(self, job_id: str, input_ids: list[int], input_length: int | None = None) -> torch.Tensor:
        """Next-token logits [T, vocab] of one sequence through the base plus this job's adapter (no dropout); a LoPA
        job's with its soft prompt, computed from the first `input_length` tokens (default all: `lopa.lopa_logits`)."""
        job = self.jobs[job_id]
        if isinstance(job.adapter, LopaAdapter):
            kwargs = packing_kwargs([job.adapter.prompt.num_virtual_tokens + len(input_ids)], self.device)
            return lopa_logits(self.model, job.adapter.prompt, input_ids, input_length, **kwargs)
        job.adapter.eval()
        self.routing.segments = {job_id: (0, len(input_ids))}
        try:
            kwargs = packing_kwargs([len(input_ids)], self.device)
            return self.model(torch.tensor([input_ids], device=self.device), use_cache=False, **kwargs).logits[0]
        finally:
            self.routing.segments = {}
            job.adapter.train()

    @torch.no_grad()
    def evaluate(self, job_id: str, data: JobData) -> float | None:
        """Mean loss over the target tokens (DPO, SimPO, ORPO: over the pairs) of one pass over `data` (a validation
        set), without dropout.

        None when the set has no target tokens. Raises DataError for a bad line, like training does.
        """
        job = self.jobs[job_id]
        job.adapter.eval()
        # The sum stays on the device (float64) and is read once: no host sync per forward.
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0  # target tokens (SFT) or pairs (DPO, SimPO, ORPO)
        try:
            for examples in self._validation_groups(job_id, data):
                for part in split_passes({job_id: examples}, self.max_pass_tokens, self.prompt_rows()):
                    batch = self._pack(part, {job_id: examples})
                    total += self._forward(batch)[job_id].double()
                    count += len(part[job_id]) if self._is_preference(job_id) else batch.num_targets[job_id]
        finally:
            job.adapter.train()
        return total.item() / count if count else None

    def _validation_groups(self, job_id: str, data: JobData):
        """The validation set's micro-batches, consecutive ones joined up to the tokens of the cohort's largest
        training pass (`joined_micro_batches`; joined, a pass over 32 micro-batches of 4x512 took 3.2x less time, run
        H16). A preference job's micro-batches stay apart: its losses are weighted per micro-batch (ORPO)."""
        budget = 0 if self._is_preference(job_id) else self.largest_pass_tokens
        return joined_micro_batches(data, budget, self.prompt_rows().get(job_id, 0))

    def export(self, job_id: str, directory) -> Path:
        """Write the job's PEFT adapter (a LoPA job's `lopa.save_lopa` export), and nothing else, into `directory`
        (created if needed); return it. Its config names the base as the job's spec does (what the tenant wrote),
        never this executor's path."""
        return self.snapshot(job_id, directory, training_state=False).write()

    def checkpoint(self, job_id: str, directory) -> Path:
        """`export`, plus the training state to resume from, into `directory`; return it."""
        return self.snapshot(job_id, directory, training_state=True).write()

    def snapshot(self, job_id: str, directory, training_state: bool) -> JobSnapshot:
        """`export` (and with `training_state`, `checkpoint`) as CPU copies of the job's state now, written into
        `directory` later by `JobSnapshot.write`, while the cohort steps on."""
        job = self.jobs[job_id]
        if isinstance(job.adapter, LopaAdapter):  # no PEFT format holds a prompt generator: lorafleet's own
            files = lopa_files(job.adapter, job.spec.base_model)
        else:
            fan_in_fan_out = any(is_conv1d(layer.base) for layer in job.layers)
            files = peft_adapter_files(job.adapter, job.spec.base_model, fan_in_fan_out)
        state = HostCopy.start(self._training_state(job)) if training_state else None
        return JobSnapshot(Path(directory), files, state)

    def _pin_ahead(self, job: Job) -> None:
        """Once a GPU job has stepped: have the host memory of its checkpoints (export and training state) pinned
        off the loop (`HostCopy.pin_ahead`), for its first checkpoint to take at once."""
        if job.pinned_ahead or self.device.type != "cuda":
            return
        job.pinned_ahead = True
        export = lopa_tensors(job.adapter) if isinstance(job.adapter, LopaAdapter) else peft_tensors(job.adapter)
        HostCopy.pin_ahead([export, self._training_state(job)])

    def _training_state(self, job: Job) -> dict:
        """What `_restore` resumes from (to be copied to the host)."""
        return {
            "spec": job.spec.model_dump_json(),
            "step": job.step,
            "micro_batches": job.micro_batches,
            "accumulated": job.accumulated,
            "window_targets": job.window_targets,
            "trained_tokens": job.trained_tokens,
            "adapter": job.adapter.state_dict(),
            "adapter_rng": job.adapter.rng_state(),
            # HostCopy copies a view's own elements: on the kernel path a job's grads are views into buffers shared
            # by the whole cohort, and saving a view would write its whole storage, other tenants' gradients included.
            "pending_grads": [p.grad for p in job.adapter.parameters()],
            "optimizer": job.optimizer.state_dict(),
            "data": job.data.state_dict(),
        }

    def _restore(self, job: Job, state: dict) -> None:
        job.step, job.micro_batches, job.accumulated = state["step"], state["micro_batches"], state["accumulated"]
        # Checkpoints written before this field count their window as having targets: they always stepped it.
        job.window_targets = state.get("window_targets", 1)
        job.trained_tokens = state.get("trained_tokens", 0)  # not counted by checkpoints older than this field
        job.done = job.step >= job.total_steps
        job.adapter.load_state_dict(state["adapter"])
        job.adapter.load_rng_state(state["adapter_rng"])
        for param, grad in zip(job.adapter.parameters(), state["pending_grads"]):
            param.grad = None if grad is None else grad.to(param.device)
        job.optimizer.load_state_dict(state["optimizer"])
        job.data.load_state_dict(state["data"])
