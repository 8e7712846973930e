"""The executor process: one per GPU (or one CPU). `lorafleet executor --device cuda:0`.

It heartbeats into Redis, takes the jobs the scheduler assigned to it, and trains them as one cohort. Between two
steps it takes in new assignments (hot join), drops jobs that were cancelled or taken away (their lease moved on),
checkpoints, and finishes jobs. Every write about a job carries the job's `attempt` (its lease): the store refuses
writes from an executor that no longer holds the job, so a job never trains on two executors at once.

Drain (SIGTERM, or `lorafleet executors drain ID`): checkpoint every job, hand it back to the queue, exit 0.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import redis
import torch

from lorafleet.executor.checkpoint import JobSnapshot
from lorafleet.executor.cohort import Cohort
from lorafleet.executor.data import DataError, JobData
from lorafleet.executor.eval_samples import record_eval_samples
from lorafleet.executor.galore_cohort import GaloreCohort
from lorafleet.executor.gpu import Nvml, device_peak_tflops, frozen_matmul_params, mfu
from lorafleet.executor.model import decoder_layers, device_auto_dtype, native_bf16
from lorafleet.executor.publisher import Publication, Publisher
from lorafleet.executor.serving import GenerationServer
from lorafleet.scheduler import config, fleet, keys
from lorafleet.scheduler.artifacts import ArtifactStore
from lorafleet.scheduler.datasets import AcceptedDataset, verified_path
from lorafleet.scheduler.generation import Generations, ServedBase
from lorafleet.scheduler.memory import JobPlan, pass_tokens
from lorafleet.scheduler.logs import configure_logging
from lorafleet.scheduler.metrics import ExecutorMetrics, Health, executor_metrics, executor_port, serve
from lorafleet.scheduler.policy import PlanConfig
from lorafleet.scheduler.records import ExecutorHeartbeat, FailureReason, GpuStats, JobRecord, JobState, StepStats
from lorafleet.scheduler.results import result_kind
from lorafleet.scheduler.spec import JobSpec, resolve_dataset
from lorafleet.scheduler.store import ExecutorView, JobStore, ProgressUpdate
from lorafleet.scheduler.submission import plan_from_files

log = logging.getLogger("lorafleet.executor")

OOM_SHRINK = 0.85  # after an out-of-memory step, offer this share of the memory offered before
FACTOR_READ_SECONDS = 10.0  # how often the executor re-reads its base's calibrated memory factor
STALL_SECONDS = 900.0  # /healthz fails when the loop did not come round for this long (loading a 70B base is slow)


def freeze_what_is_loaded() -> None:
    """Move every object alive now (the imports', the base's: half a million and more) out of the collector's reach.
    Python's full collections walk every tracked object; with them in reach, one took 0.25 s of the training loop on
    a CPU every 10-15 s of training, the objects that checkpoints and steps leave behind setting it off. What is
    frozen is never collected: `thaw_and_collect` when the base goes."""
    gc.collect()
    gc.freeze()


def thaw_and_collect() -> None:
    """Give what `freeze_what_is_loaded` froze back to the collector, and collect: the unloaded base's objects, cycles
    among them too, are freed (their GPU memory with them) before another base loads."""
    gc.unfreeze()
    gc.collect()


@dataclass
class Lease:
    job_id: str
    tenant: str
    attempt: int
    spec: JobSpec
    plan: JobPlan
    resumed: bool = False  # joined from a checkpoint: earlier attempts trained it
    trained_tokens: int = 0  # target tokens trained on in this attempt


class Executor:
    def __init__(
        self,
        store: JobStore,
        executor_id: str,
        device: str,
        artifacts: ArtifactStore,
        memory_bytes: int | None = None,
        heartbeat_ttl: float = fleet.HEARTBEAT_TTL_SECONDS,
        poll_seconds: float = 0.2,
        metrics: ExecutorMetrics | None = None,
        metrics_port: int = 0,
        activation_checkpointing: int = 0,
        max_pass_tokens: int | None = None,
        health: Health | None = None,
        peak_tflops: float | None = None,
    ):
        self.store, self.executor_id, self.device, self.artifacts = store, executor_id, device, artifacts
        self.health = health or Health(float("inf"))
        self.heartbeat_ttl, self.poll_seconds = heartbeat_ttl, poll_seconds
        self.metrics, self.metrics_port = metrics, metrics_port
        self.activation_checkpointing = activation_checkpointing
        self.max_pass_tokens = max_pass_tokens
        self.total_bytes = memory_bytes or _device_memory(device)
        self.cohort: Cohort | GaloreCohort | None = None  # a GaloreCohort runs one GaLore job alone
        self.compat_key: str | None = None
        self.base_bytes = 0
        # Measured device memory peak of the last step and the tokens of its largest pass (a GPU executor takes
        # larger passes than planned where its free memory allows): raw, the scheduler applies its model to them.
        self.step_peak_bytes, self.step_pass_tokens = 0, 0
        self.activation_bytes_per_token = 0.0  # the memory model's estimate for the loaded base; 0: unknown
        self.memory_factor, self.factor_read_at = 1.0, -FACTOR_READ_SECONDS  # its calibration, as last read
        self.leases: dict[str, Lease] = {}
        self.synced_seq = 0  # the assignment sequence of the last completed `sync_assignments`
        self.validation: dict[str, JobData] = {}  # job id -> its validation set, evaluated at each checkpoint
        self.stopping = threading.Event()
        self.scratch = Path(tempfile.mkdtemp(prefix=f"lorafleet-{executor_id}-"))
        self.nvml = Nvml(device)
        self.peak_tflops = device_peak_tflops(device, peak_tflops)  # None: no MFU
        self.matmul_params = 0  # of the loaded base: what MFU counts
        self.last_step: StepStats | None = None
        self.gpu_stats: GpuStats | None = None  # NVML's last reading, taken by the heartbeat thread
        self.publisher = Publisher(store, artifacts, executor_id, metrics)
        self.publication_ids = itertools.count()  # each snapshot's own scratch directory
        self.serving = GenerationServer(Generations(store, config.hf_hub_cache(), config.model_roots()),
                                        executor_id, artifacts, self.scratch, metrics)

    # ---- the loop ----

    def run(self) -> None:
        self.hand_back_orphans()
        self.send_heartbeat()
        beats = threading.Thread(target=self._heartbeats, daemon=True)
        beats.start()
        log.info("executor %s on %s ready", self.executor_id, self.device)
        while not self.stopping.is_set():
            try:
                if not self.turn():
                    break
            except redis.ConnectionError as exc:
                # The cohort stays in memory; if the outage outlasts the heartbeat TTL the scheduler hands our jobs
                # to others and our writes are refused once Redis is back (their leases moved on).
                log.warning("Redis unreachable (%s); retrying in 2 s", exc)
                self.health.tick(f"Redis unreachable: {exc}")
                self.stopping.wait(2.0)
        self.health.tick("draining")
        self.stopping.set()
        beats.join()  # no heartbeat may re-register this executor once drain() has deregistered it
        self.drain()

    def turn(self) -> bool:
        """One turn of the loop: take in and let go of jobs, one training step, the generation requests waiting;
        False once a drain is asked. A turn that trains with no request waiting costs three Redis round trips
        (`executor_view`, `record_step`, `take_requests`)."""
        if self.sync_assignments().drain:
            return False
        if self.cohort is not None and self.cohort.active_jobs():
            self.train_step()
            self.serve_generation(training=True)
        elif not self.serve_generation(training=False):
            self.stopping.wait(self.poll_seconds)
        self.health.tick()
        return True

    def _heartbeats(self) -> None:
        while not self.stopping.wait(self.heartbeat_ttl / 4):
            try:
                self.read_gpu()
                self.send_heartbeat()
            except Exception:  # Redis briefly away: the next beat retries; missing several declares us dead.
                log.exception("heartbeat failed")

    def heartbeat(self) -> ExecutorHeartbeat:
        synced_seq = self.synced_seq  # read before the leases: every job it covers is in them by now
        leases = dict(self.leases)
        # A finished job is held until its result is recorded (executor/publisher.py); leases first: the newer attempt
        held = {**self.publisher.held(), **{job_id: lease.attempt for job_id, lease in leases.items()}}
        return ExecutorHeartbeat(
            executor_id=self.executor_id, host=socket.gethostname(), device=self.device,
            dtypes=tuple(_supported_dtypes(self.device)), auto_dtype=device_auto_dtype(torch.device(self.device)),
            pid=os.getpid(), total_bytes=self.total_bytes,
            peak_bytes=self.step_peak_bytes if leases else _allocated_bytes(self.device),
            pass_tokens=self.step_pass_tokens if leases else 0, compat_key=self.compat_key,
            base_bytes=self.base_bytes, pool_bytes=self.serving.pool_allocated_bytes(), jobs=held,
            synced_seq=synced_seq, metrics_port=self.metrics_port, max_pass_tokens=self.max_pass_tokens,
            last_step=self.last_step if leases else None, gpu=self.gpu_stats,
        )

    def read_gpu(self) -> None:
        """NVML's readings, off the training loop (the heartbeat thread calls this)."""
        self.gpu_stats = self.nvml.read()
        if self.metrics:
            self.metrics.record_gpu(self.gpu_stats)
            self.metrics.memory_allocated.set(_allocated_bytes(self.device))  # an idle executor's too

    def send_heartbeat(self) -> None:
        fleet.heartbeat(self.store.r, self.heartbeat(), ttl=self.heartbeat_ttl)

    # ---- assignments ----

    def sync_assignments(self) -> ExecutorView:
        """Read this executor's holding index (one small hash, not every job), pause and drain requests in one round
        trip: drop the jobs it no longer gives us (cancelled, requeued, moved on while we stalled), pause those whose
        tenant asked, take in jobs newly scheduled here. Called between steps, so a job leaves at a step boundary.
        Once a drain is asked, nothing is taken in: the caller drains (`drain`)."""
        view = self.store.executor_view(self.executor_id)
        if view.drain:
            return view
        for job_id, lease in list(self.leases.items()):
            if view.held.get(job_id) != lease.attempt:
                log.info("job %s left this executor (its lease is gone)", job_id)
                self._release(job_id)
        for job_id in view.pauses & set(self.leases):
            self.pause(self.leases[job_id])
        for record in self.store.jobs(job_id for job_id in sorted(view.held) if job_id not in self.leases):
            if record.state == JobState.SCHEDULED and record.executor_id == self.executor_id:
                self.admit(record)
        self.synced_seq = view.seq
        return view

    def pause(self, lease: Lease) -> None:
        """Checkpoint the job (its optimizer state and data position with it) and leave it paused: a resume puts it
        back in the queue, and whichever executor takes it goes on from this checkpoint as if never stopped."""
        self.save_checkpoint(lease)
        self.publisher.wait()  # paused only once the checkpoint it resumes from is recorded
        if self.store.paused_at_checkpoint(lease.job_id, lease.attempt, self.executor_id):
            log.info("job %s paused at step %d", lease.job_id, self.cohort.jobs[lease.job_id].step)
        else:
            log.warning("job %s: pause refused: this executor no longer holds the job", lease.job_id)
        self._release(lease.job_id)

    def hand_back_orphans(self) -> None:
        """Jobs a previous process with this executor id held (it was restarted before its heartbeat expired)."""
        _, held = self.store.holding(self.executor_id)
        for job_id, attempt in held.items():
            self.store.requeue(job_id, (JobState.SCHEDULED, JobState.RUNNING), "executor restarted", attempt=attempt,
                               executor_id=self.executor_id, executor_died=True)

    def admit(self, job: JobRecord) -> None:
        job_id, attempt, spec = job.job_id, job.attempt, job.spec
        try:
            plan = job.plan or plan_from_files(spec, job.tenant, config.data_root(), config.hf_hub_cache(),
                                               config.model_roots())
        except Exception as exc:
            self.store.fail(job_id, JobState.SCHEDULED, f"job {job_id} failed: cannot start: {exc}", reason=FailureReason.START, attempt=attempt,
                            executor_id=self.executor_id)
            return
        if self.leases and plan.compat_key != self.compat_key:  # not the job's fault: hand it back
            log.warning("job %s needs base %s while this cohort runs %s; handing it back", job_id, plan.compat_key,
                        self.compat_key)
            self.store.requeue(job_id, JobState.SCHEDULED, "wrong base for this executor", attempt=attempt,
                               executor_id=self.executor_id)
            return
        try:
            resume_from = self._join(job, plan)
        except Exception as exc:  # a job that cannot start fails alone, with the reason
            log.warning("job %s cannot start: %s", job_id, exc)
            self._release(job_id)
            self.store.fail(job_id, JobState.SCHEDULED, f"job {job_id} failed: cannot start: {exc}", reason=FailureReason.START, attempt=attempt,
                            executor_id=self.executor_id)
            return
        if not self.store.start(job_id, attempt, self.executor_id):
            self.cohort.remove_job(job_id)
            self.validation.pop(job_id, None)
            return
        self.leases[job_id] = Lease(job_id, job.tenant, attempt, spec, plan, resumed=resume_from is not None)
        log.info("job %s joined the cohort (%d jobs)%s", job_id, len(self.leases), " from checkpoint" if resume_from else "")

    def _join(self, job: JobRecord, plan: JobPlan) -> Path | None:
        """Load the job's base if needed and add it to the cohort (from its checkpoint, if it has one)."""
        spec = job.spec
        if plan.compat_key != self.compat_key:
            self._load_base(spec, plan)
        accepted = self.store.accepted_datasets(job.job_id)
        dataset = _dataset_path(accepted, spec, job.tenant, "dataset")
        resume_from = self.artifacts.fetch(job.checkpoint_uri, self.scratch) if job.checkpoint_uri else None
        self.cohort.add_job(job.job_id, spec, dataset, resume_from=resume_from, dataset_name=spec.dataset)
        if isinstance(self.cohort, GaloreCohort):  # its model is the job's own, loaded as it joined
            self._measure_base()
        if spec.validation_dataset is not None:
            hp = spec.hyperparameters
            path = _dataset_path(accepted, spec, job.tenant, "validation_dataset")
            self.validation[job.job_id] = JobData(path, spec.dataset_format, self.cohort.tokenizer, hp.max_seq_len,
                                                  hp.batch_size, hp.seed, name=spec.validation_dataset)
        return resume_from

    def _load_base(self, spec: JobSpec, plan: JobPlan) -> None:
        """Load the job's pinned base snapshot (`plan.base_snapshot`), never re-resolving its name; for a GaLore job,
        the cohort that runs it alone (it loads its own copy of the base as it joins)."""
        self._unload()
        if spec.adapter.type == "galore":
            self.cohort = GaloreCohort(plan.base_snapshot, dtype=spec.dtype, device=self.device,
                                       max_pass_tokens=self.max_pass_tokens)
        else:
            self.cohort = Cohort(plan.base_snapshot, quantization=spec.quantization, dtype=spec.dtype,
                                 device=self.device, activation_checkpointing=self.activation_checkpointing,
                                 max_pass_tokens=self.max_pass_tokens)
        self.compat_key = plan.compat_key
        # The memory model's bytes per token for this base, in the dtype it computes in here: from the job's plan,
        # which sized it at submission (activations of one micro-batch / its tokens).
        size = plan.size(device_auto_dtype(torch.device(self.device)))
        self.activation_bytes_per_token = size.activation_bytes / plan.tokens_per_step
        if not isinstance(self.cohort, GaloreCohort):
            self._measure_base()
        freeze_what_is_loaded()

    def _measure_base(self) -> None:
        """The loaded base's bytes and matmul parameters (what MFU counts), reported at once."""
        self.base_bytes = sum(p.numel() * p.element_size() for p in self.cohort.model.parameters())
        self.matmul_params = frozen_matmul_params(decoder_layers(self.cohort.model))
        self.send_heartbeat()

    def _unload(self) -> None:
        self.cohort, self.compat_key, self.base_bytes = None, None, 0
        self.serving.release()  # its generator holds the base's model and its page pool
        thaw_and_collect()  # the base's memory free before the next one loads, cycles among its objects too
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _release(self, job_id: str) -> None:
        lease = self.leases.pop(job_id, None)
        if lease is not None and self.metrics:
            self.metrics.forget_job(job_id, lease.tenant)
        self.validation.pop(job_id, None)
        if self.cohort is not None and job_id in self.cohort.jobs:
            self.cohort.remove_job(job_id)
        if isinstance(self.cohort, GaloreCohort) and not self.cohort.jobs:  # its model was its job's own: not kept
            self._unload()

    # ---- generation (executor/serving.py) ----

    def serve_generation(self, training: bool) -> bool:
        """Answer waiting generation requests for the loaded base; an executor without jobs first loads the base of
        requests no executor serves. Whether any request was answered."""
        if not self.leases and (wanted := self.serving.base_to_load(self.compat_key)) is not None:
            self._load_base_to_serve(wanted)
        if self.cohort is None or isinstance(self.cohort, GaloreCohort):  # a GaLore job's model is its own
            return False
        return self.serving.serve(self.cohort, self.compat_key, training) > 0

    def _load_base_to_serve(self, base: ServedBase) -> None:
        self._unload()
        try:
            self.cohort = Cohort(self.serving.weights_of(base), quantization=base.quantization, dtype=base.dtype,
                                 device=self.device, activation_checkpointing=self.activation_checkpointing,
                                 max_pass_tokens=self.max_pass_tokens)
        except Exception as exc:  # its requests are answered with the reason; the executor goes on
            log.warning("cannot load base %s to serve generation: %s", base.base_name, exc)
            self.serving.fail_base(base, f"the base {base.base_name!r} could not be loaded: {exc}")
            return
        self.compat_key = base.compat_key
        self.activation_bytes_per_token = 0.0  # unknown until a job's plan sizes it: its passes run as planned
        self._measure_base()
        freeze_what_is_loaded()

    # ---- one step ----

    def pass_size(self, allocated: int) -> int | None:
        """This step's largest pass: the planned max_pass_tokens, or on a GPU as many tokens as the memory left
        after `allocated` holds by the memory model's estimate, calibrated as the scheduler calibrates it (so a base
        the model underestimates does not run out of memory in a larger pass than planned)."""
        if self.max_pass_tokens is None or not self.device.startswith("cuda"):
            return self.max_pass_tokens
        free = self.total_bytes * PlanConfig().memory_fraction - allocated
        return pass_tokens(self.max_pass_tokens, free, self.activation_bytes_per_token * self._memory_factor())

    def _memory_factor(self) -> float:
        """The scheduler's calibrated factor for the loaded base (1 until it has learned one; never below 1), read
        at most every FACTOR_READ_SECONDS."""
        now = time.monotonic()
        if now - self.factor_read_at >= FACTOR_READ_SECONDS:
            self.factor_read_at = now
            try:
                factor = self.store.r.hget(keys.MEMORY_FACTORS, self.compat_key or "")
            except redis.RedisError:
                factor = None
            self.memory_factor = max(1.0, float(factor)) if factor else 1.0
        return self.memory_factor

    def train_step(self) -> None:
        _reset_peak(self.device)
        allocated_before = _allocated_bytes(self.device)
        self.cohort.max_pass_tokens = self.pass_size(allocated_before)
        replays = self._graph_replays()
        started = time.perf_counter()
        try:
            results = self.cohort.step()
        except torch.OutOfMemoryError:
            self.recover_from_oom()
            return
        seconds = time.perf_counter() - started
        graphed = self._graph_replays() > replays
        allocated, peak = _memory_bytes(self.device)
        self.step_peak_bytes = peak
        self.step_pass_tokens = self.cohort.largest_pass_tokens if self.max_pass_tokens is not None else 0
        tokens_by_tenant = self._measure_step(results, seconds, graphed)
        trained = sum(tokens_by_tenant.values())
        usage = {tenant: seconds * tokens / (trained or 1) for tenant, tokens in tokens_by_tenant.items()}
        updates = [update for job_id, result in results.items()
                   if (update := self._progress_of(job_id, result, seconds)) is not None]
        kept = self.store.record_step(updates, self.executor_id, usage)  # one round trip for the whole step
        self.eval_samples({update.job_id: update.step for update, held in zip(updates, kept)
                           if held and results[update.job_id].checkpoint_due})
        for update, held in zip(updates, kept):
            lease, result = self.leases[update.job_id], results[update.job_id]
            if not held:
                self._release(update.job_id)
                continue
            if self.metrics:
                self.metrics.record_job(update.job_id, lease.tenant, result.loss, result.step, result.total_steps)
            if result.done:
                self.finish(lease)
            elif result.checkpoint_due:
                self.save_checkpoint(lease)
        if self.metrics:
            self.metrics.cohort_jobs.set(len(self.leases))
            self.metrics.memory_allocated.set(allocated)  # after the step, before its snapshots' staging copies
            self.metrics.memory_peak.labels(executor=self.executor_id).set(peak)

    def eval_samples(self, checkpointing: dict[str, int]) -> None:
        """The eval_samples events of the jobs that checkpoint or finish this step (job id -> step), before their
        checkpoints and adapters are written: one generate batch on the cohort's generator (executor/eval_samples.py)."""
        steps = {job_id: step for job_id, step in checkpointing.items() if self.leases[job_id].spec.eval_samples}
        if steps and not isinstance(self.cohort, GaloreCohort):  # a GaLore job has none (refused at submission)
            record_eval_samples(self.store, self.serving.generator_for, self.cohort, steps)

    def _progress_of(self, job_id: str, result, seconds: float) -> ProgressUpdate | None:
        """What to record of a job's step; None when the step failed the job (failed and released here)."""
        lease = self.leases[job_id]
        if result.error is not None:
            self.store.fail(job_id, JobState.RUNNING, result.error, reason=FailureReason.TRAINING,
                            attempt=lease.attempt, executor_id=self.executor_id)
            self._release(job_id)
            return None
        lease.trained_tokens += result.tokens
        if self._untrained_after_an_epoch(lease):
            self._fail_untrained(lease)
            return None
        metrics = {"loss": result.loss, "lr": result.lr, "tokens": result.tokens,
                   "trained_tokens": self.cohort.jobs[job_id].trained_tokens,
                   "tokens_per_s": result.tokens / seconds, "grad_norm": result.grad_norm}
        if result.rewards is not None:  # a preference job's (DPO, SimPO, ORPO)
            metrics.update(result.rewards.metrics())
        if result.checkpoint_due and job_id in self.validation:
            try:
                metrics["eval_loss"] = self.cohort.evaluate(job_id, self.validation[job_id])
            except DataError as exc:
                self.store.fail(job_id, JobState.RUNNING, f"job {job_id} failed: validation data: {exc}",
                                reason=FailureReason.VALIDATION, attempt=lease.attempt, executor_id=self.executor_id)
                self._release(job_id)
                return None
        return ProgressUpdate(job_id, result.step, result.total_steps, metrics, lease.attempt)

    def _graph_replays(self) -> int:
        """The steps the cohort has run as CUDA graph replays (a GaLore cohort runs none)."""
        return 0 if isinstance(self.cohort, GaloreCohort) else self.cohort.graphs.replays

    def _measure_step(self, results: dict, seconds: float, graphed: bool) -> dict[str, int]:
        """The step's `StepStats` (kept for the heartbeat) and its metrics; returns each tenant's tokens trained (a
        step's GPU time is charged by them). Read before any job of the step leaves the cohort."""
        tokens_by_tenant: dict[str, int] = {}
        for job_id, result in results.items():
            tenant = self.leases[job_id].tenant
            tokens_by_tenant[tenant] = tokens_by_tenant.get(tenant, 0) + result.tokens
        input_tokens = self.cohort.step_tokens
        self.last_step = StepStats(
            seconds=seconds, input_tokens=input_tokens, trained_tokens=sum(tokens_by_tenant.values()),
            planned_tokens=sum(self.leases[job_id].plan.tokens_per_step for job_id in results),
            mfu=mfu(self.matmul_params, input_tokens, seconds, self.peak_tflops), graphed=graphed)
        if self.metrics:
            self.metrics.record_step(self.last_step, tokens_by_tenant)
        return tokens_by_tenant

    def save_checkpoint(self, lease: Lease) -> None:
        """Snapshot a resumable checkpoint now; the publisher writes and publishes it and points the job at it (only
        while the lease holds). A storage failure is reported and training goes on from the last one."""
        step = self.cohort.jobs[lease.job_id].step
        self._publish_later(lease, f"checkpoint-{step}", step)

    def _publish_later(self, lease: Lease, name: str, step: int | None) -> None:
        """Take the job's snapshot at this step boundary (with its training state for a checkpoint: `step` set) and
        hand it to the publisher, off the training loop."""
        directory = self.scratch / lease.job_id / f"{name}-{next(self.publication_ids)}"
        publication = Publication(lease.job_id, lease.tenant, lease.attempt, name, JobSnapshot(directory), step,
                                  config.keep_checkpoints())
        started = time.perf_counter()
        try:
            snapshot = self.cohort.snapshot(lease.job_id, directory, training_state=step is not None)
        except OSError as exc:  # a GaLore job's model is written here, on the loop
            self.publisher.failed_on_the_loop(publication, exc)
            return
        if self.metrics:
            self.metrics.snapshot_duration.observe(time.perf_counter() - started)
        self.publisher.submit(replace(publication, snapshot=snapshot))

    def _untrained_after_an_epoch(self, lease: Lease) -> bool:
        """A whole epoch gave no target token: no later one will either."""
        job = self.cohort.jobs.get(lease.job_id)
        return not lease.resumed and lease.trained_tokens == 0 and job is not None and job.data.epoch >= 1

    def _fail_untrained(self, lease: Lease) -> None:
        max_seq_len = lease.spec.hyperparameters.max_seq_len
        self.store.fail(lease.job_id, JobState.RUNNING, (
            f"job {lease.job_id} failed: nothing was trained: no example of {lease.spec.dataset} has a target "
            f"token within max_seq_len={max_seq_len} (shorten the prompts or raise max_seq_len)"),
            reason=FailureReason.UNTRAINED, attempt=lease.attempt, executor_id=self.executor_id)
        self._release(lease.job_id)

    def finish(self, lease: Lease) -> None:
        if lease.trained_tokens == 0 and not lease.resumed:  # an untrained adapter is no success
            self._fail_untrained(lease)
            return
        # The job leaves the cohort now; it is reported succeeded once the publisher has stored its result.
        self._publish_later(lease, result_kind(lease.spec.adapter.type), step=None)
        self._release(lease.job_id)

    def recover_from_oom(self) -> None:
        """The cohort did not fit after all. A step that broke half-way leaves its jobs' gradients and data cursors
        inconsistent, so every job goes back to the queue from its last checkpoint (what it resumes from is exact),
        the cohort is dropped, and this executor offers less memory to the scheduler from now on, so the same
        cohort is not planned here again."""
        self.total_bytes = int(self.total_bytes * OOM_SHRINK)
        log.warning("out of memory with %d jobs; handing them back, now offering %.1f GiB", len(self.leases),
                    self.total_bytes / 2**30)
        for job_id, lease in list(self.leases.items()):
            self.store.requeue(job_id, (JobState.SCHEDULED, JobState.RUNNING), "out of memory", attempt=lease.attempt,
                               executor_id=self.executor_id)
            self._release_without_cohort(job_id)
        self._unload()
        self.send_heartbeat()

    def _release_without_cohort(self, job_id: str) -> None:
        """`_release` for a cohort about to be dropped whole (its state is not to be touched again)."""
        lease = self.leases.pop(job_id)
        self.validation.pop(job_id, None)
        if self.metrics:
            self.metrics.forget_job(job_id, lease.tenant)

    # ---- leaving ----

    def drain(self) -> None:
        """Checkpoint every job, deregister, then hand the jobs back to the queue: deregistered first, so that the
        scheduler cannot give a handed-back job to this executor again (it claims only for live executors)."""
        for lease in self.leases.values():
            self.save_checkpoint(lease)
        self.publisher.wait()  # every checkpoint (and finished job's result) recorded before the jobs go back
        fleet.forget(self.store.r, self.executor_id)
        for job_id, lease in list(self.leases.items()):
            self.store.requeue(job_id, (JobState.SCHEDULED, JobState.RUNNING), "executor drained",
                               attempt=lease.attempt, executor_id=self.executor_id)
            self._release(job_id)
        _, held = self.store.holding(self.executor_id)  # assigned here but not taken in yet
        for job_id, attempt in held.items():
            self.store.requeue(job_id, JobState.SCHEDULED, "executor drained", attempt=attempt,
                               executor_id=self.executor_id)
        log.info("executor %s drained", self.executor_id)


def _dataset_path(accepted: dict[str, AcceptedDataset], spec: JobSpec, tenant: str, field: str) -> Path:
    """The accepted copy, checked against its digest; a job submitted without one (straight into the store, by
    operator tools) is read from the data root."""
    if field in accepted:
        return verified_path(config.dataset_store(), accepted[field])
    return resolve_dataset(getattr(spec, field), config.data_root(), tenant, field)


def _device_memory(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _memory_bytes(device: str) -> tuple[int, int]:
    """(bytes allocated now, the peak since `_reset_peak`); on the CPU the process's peak resident size for both.
    On a GPU one read of the allocator's statistics as they come: torch.cuda.memory_allocated and
    max_memory_allocated each flatten and sort the whole table first, and the loop reads it between every two steps."""
    if device.startswith("cuda"):
        stats = torch.cuda.memory_stats_as_nested_dict(torch.device(device))  # empty before CUDA's first use
        allocated = stats.get("allocated_bytes", {}).get("all", {})
        return allocated.get("current", 0), allocated.get("peak", 0)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak, peak


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def _allocated_bytes(device: str) -> int:
    return _memory_bytes(device)[0]


def _supported_dtypes(device: str) -> list[str]:
    """The compute dtypes this device runs natively: what the scheduler may send here (heartbeat `dtypes`)."""
    return ["bfloat16", "float32"] if native_bf16(torch.device(device)) else ["float32"]


def main(device: str, executor_id: str | None, metrics_port: int | None, memory_bytes: int | None,
         heartbeat_ttl: float = fleet.HEARTBEAT_TTL_SECONDS, activation_checkpointing: int = 0,
         max_pass_tokens: int | None = None, metrics_addr: str = "0.0.0.0", peak_tflops: float | None = None) -> None:
    """Entry point of `lorafleet executor`; metrics_port None: the device's default (`metrics.executor_port`)."""
    configure_logging("executor")
    metrics_port = executor_port(device) if metrics_port is None else metrics_port
    # Stable across restarts, so its series and dashboards follow the GPU; a restarted process hands back what the
    # previous one held (`hand_back_orphans`). Two executors on one device need --id each.
    executor_id = executor_id or f"{socket.gethostname()}-{device.replace(':', '')}"
    metrics, health = executor_metrics(executor_id), Health(STALL_SECONDS)
    port = serve(metrics.registry, metrics_port, metrics_addr, health)  # first: a taken port ends it at once
    store = JobStore.from_url(config.redis_url())
    store.ensure_schema()
    log.info("metrics on http://%s:%d/metrics (and /healthz, /readyz)", metrics_addr, port)
    executor = Executor(
        store, executor_id, device, ArtifactStore(config.artifact_root()), memory_bytes=memory_bytes,
        heartbeat_ttl=heartbeat_ttl, metrics=metrics, metrics_port=port,
        activation_checkpointing=activation_checkpointing, max_pass_tokens=max_pass_tokens, health=health,
        peak_tflops=peak_tflops,
    )
    signal.signal(signal.SIGTERM, lambda *_: executor.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: executor.stopping.set())
    executor.run()
