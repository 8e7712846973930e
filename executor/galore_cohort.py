"""The executor's cohort while it runs a GaLore job (issue 18): that one job, behind the part of `Cohort`'s interface
the worker drives (add_job, step, checkpoint, export, evaluate, remove_job), so the worker's loop, leases, progress,
checkpoints, failure, cancellation and publishing are the ones of LoRA jobs.

A GaLore job trains its own copy of the base (executor/galore_job.py): there is no shared base to load before it
joins, and nothing to keep loaded once it leaves. The scheduler never plans a second job beside it (its plan's
compatibility key is its own, scheduler/submission.py), and `add_job` refuses one all the same.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorafleet.executor.checkpoint import JobSnapshot
from lorafleet.executor.cohort import StepResult, joined_micro_batches, split_passes
from lorafleet.executor.data import JobData
from lorafleet.executor.galore_job import GaloreJob, GaloreSettings
from lorafleet.scheduler.spec import JobSpec


def galore_settings(spec: JobSpec) -> GaloreSettings:
    """The job's GaLore options, as its spec gives them."""
    galore = spec.adapter.galore
    return GaloreSettings(rank=galore.rank, update_proj_gap=galore.update_proj_gap, scale=galore.scale,
                          proj_type=galore.proj_type, target_modules=tuple(spec.adapter.target_modules))


class GaloreMember:
    """What the worker reads of a cohort's job (`cohort.Job`), for the GaLore job."""

    def __init__(self, job: GaloreJob):
        self.job = job

    @property
    def step(self) -> int:  # optimizer steps done
        return self.job.steps_done

    @property
    def trained_tokens(self) -> int:
        return self.job.trained_tokens

    @property
    def data(self) -> JobData:
        return self.job.data

    @property
    def active(self) -> bool:
        return self.job.active


class GaloreCohort:
    def __init__(self, base_model_path, dtype: str = "auto", device: str = "cpu",
                 max_pass_tokens: int | None = None):
        self.base_model_path, self.dtype, self.device = str(base_model_path), dtype, device
        self.max_pass_tokens = max_pass_tokens  # set by the worker each step; the job's micro-batch runs in passes
        self.step_tokens, self.largest_pass_tokens = 0, 0  # input tokens of the last step, and of its largest pass
        self.jobs: dict[str, GaloreMember] = {}

    @property
    def job(self) -> GaloreJob:
        return next(iter(self.jobs.values())).job

    @property
    def model(self) -> torch.nn.Module:
        return self.job.model

    @property
    def tokenizer(self):
        return self.job.tokenizer

    def active_jobs(self) -> list[str]:
        return [job_id for job_id, job in self.jobs.items() if job.active]

    def add_job(self, job_id: str, spec: JobSpec, dataset_path, resume_from: Path | None = None,
                dataset_name: str | None = None) -> None:
        """Start the GaLore job (from `resume_from`, its checkpoint, if given). Raises ValueError for a second job or
        a job that is not a GaLore job, and what `GaloreJob` raises."""
        if self.jobs:
            raise ValueError(f"job {job_id!r}: a GaLore job runs alone; this executor runs {next(iter(self.jobs))!r}")
        if spec.adapter.type != "galore":
            raise ValueError(f"job {job_id!r} is a {spec.adapter.type} job; this executor runs a GaLore job")
        self.jobs[job_id] = GaloreMember(GaloreJob(
            self.base_model_path, galore_settings(spec), spec.hyperparameters, dataset_path, spec.dataset_format,
            self.dtype, self.device, dataset_name=dataset_name, resume_from=resume_from))

    def remove_job(self, job_id: str) -> None:
        if job_id not in self.jobs:
            raise KeyError(f"no job {job_id!r} in this cohort")
        del self.jobs[job_id]

    def step(self) -> dict[str, StepResult]:
        results = {job_id: self.jobs[job_id].job.step(self.max_pass_tokens) for job_id in self.active_jobs()}
        self.step_tokens = sum(m.job.last_input_tokens for m in self.jobs.values())
        self.largest_pass_tokens = max((m.job.largest_pass_tokens for m in self.jobs.values()), default=0)
        return results

    @torch.no_grad()
    def evaluate(self, job_id: str, data: JobData) -> float | None:
        """Mean loss over the target tokens of one pass over `data` (a validation set); None when it has none.
        Micro-batches are joined up to the last step's largest pass, as a LoRA cohort's are (`joined_micro_batches`),
        and split by `max_pass_tokens`. Raises DataError for a bad line, like training does."""
        job = self.jobs[job_id].job
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # on the device: see Cohort.evaluate
        count = 0
        for examples in joined_micro_batches(data, self.largest_pass_tokens):
            for part in split_passes({job_id: examples}, self.max_pass_tokens):
                targets = sum(example.num_targets for example in part[job_id])
                if targets:
                    total += job.loss_sum(part[job_id]).double()
                    count += targets
        return total.item() / count if count else None

    def checkpoint(self, job_id: str, directory) -> Path:
        return self.jobs[job_id].job.checkpoint(directory)

    def export(self, job_id: str, directory) -> Path:
        """The trained model as a full Hugging Face model directory (`GaloreJob.export`)."""
        return self.jobs[job_id].job.export(directory)

    def snapshot(self, job_id: str, directory, training_state: bool) -> JobSnapshot:
        """Written now, on the loop: a CPU copy of a whole model would cost what writing it costs, and the job runs
        alone, so no other job waits for it (only the publishing is left to the publisher's thread)."""
        written = self.checkpoint(job_id, directory) if training_state else self.export(job_id, directory)
        return JobSnapshot(written)
