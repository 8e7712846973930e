"""Publishing checkpoints and finished adapters off the training loop.

Writing an adapter's files and copying them into the artifact store takes about a second on a large base; done on
the training loop, the whole cohort would wait for it. Instead the loop takes a `JobSnapshot` at the step boundary
(CPU copies of the job's tensors: consistent, and cheap next to the write) and hands it here; one thread writes it,
publishes it and records the result, in the order the snapshots were taken (a job's checkpoints are recorded in
step order, its result after them).

What the loop used to guarantee still holds:
- A stale holder writes nothing reachable: the copy happens only while the lease holds, the pointer is set only by
  the lease holder (`record_checkpoint` / `succeed`), and a refused copy is deleted.
- A finished job's slot in the cohort is freed at once, but the job is reported succeeded only once its adapter is
  stored; until then the executor's heartbeat still lists it (`held`), so the scheduler does not take it for lost.
  Killed meanwhile, the job is requeued with its executor and resumes from its last recorded checkpoint.
- A storage failure fails the job alone (`FailureReason.PUBLISH`); a failed checkpoint is reported and training goes
  on from the last one.
- Drain and pause wait for what is pending (`wait`).
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass, replace

import redis

from lorafleet.executor.checkpoint import JobSnapshot
from lorafleet.scheduler.artifacts import ArtifactStore
from lorafleet.scheduler.metrics import ExecutorMetrics
from lorafleet.scheduler.records import FailureReason, JobState
from lorafleet.scheduler.store import JobStore

log = logging.getLogger("lorafleet.executor")

REDIS_RETRY_SECONDS = 2.0


@dataclass(frozen=True)
class Publication:
    """One artifact of one lease to publish: a checkpoint (`step` set) or the job's result (`step` None)."""
    job_id: str
    tenant: str
    attempt: int
    name: str  # what the artifact's directory name starts with: checkpoint-<step>, adapter, model
    snapshot: JobSnapshot
    step: int | None = None
    keep_checkpoints: int = 1
    handed_over: float = 0.0  # time.monotonic() when the loop handed it to the publisher

    @property
    def is_result(self) -> bool:
        return self.step is None

    @property
    def kind(self) -> str:
        return "result" if self.is_result else "checkpoint"


class Publisher:
    def __init__(self, store: JobStore, artifacts: ArtifactStore, executor_id: str,
                 metrics: ExecutorMetrics | None = None):
        self.store, self.artifacts, self.executor_id, self.metrics = store, artifacts, executor_id, metrics
        self.queue: queue.Queue[Publication] = queue.Queue()
        self.pending: dict[str, list[Publication]] = {}  # job id -> its publications not recorded yet
        self.lock = threading.Lock()
        threading.Thread(target=self._run, name="publisher", daemon=True).start()

    def submit(self, publication: Publication) -> None:
        publication = replace(publication, handed_over=time.monotonic())
        with self.lock:
            self.pending.setdefault(publication.job_id, []).append(publication)
            self._count_backlog()
        self.queue.put(publication)

    def _count_backlog(self) -> None:
        if self.metrics:
            self.metrics.publish_backlog.set(sum(len(publications) for publications in self.pending.values()))

    def wait(self) -> None:
        """Until everything submitted so far is recorded (or refused, or failed)."""
        self.queue.join()

    def held(self) -> dict[str, int]:
        """Job id -> attempt of the jobs with a publication pending: the executor holds them until it is recorded."""
        with self.lock:
            return {job_id: publications[-1].attempt for job_id, publications in self.pending.items()}

    def _run(self) -> None:
        while True:
            publication = self.queue.get()
            outcome = "failed"
            try:
                outcome = self._publish_retrying(publication)
            except Exception:  # never lose the thread: the job is requeued when this executor goes
                log.exception("job %s: publishing %s failed", publication.job_id, publication.name)
            finally:
                with self.lock:
                    left = self.pending[publication.job_id]
                    left.remove(publication)
                    if not left:
                        del self.pending[publication.job_id]
                    self._count_backlog()
                if self.metrics:
                    self.metrics.record_publication(publication.kind, outcome,
                                                    time.monotonic() - publication.handed_over)
                self.queue.task_done()

    def _publish_retrying(self, publication: Publication) -> str:
        """Redis briefly away: try again (the writes are lease-checked, so a lease lost meanwhile is refused). The
        outcome: recorded, refused (the lease moved on) or failed (storage)."""
        while True:
            try:
                return self._publish(publication)
            except redis.ConnectionError as exc:
                log.warning("job %s: Redis unreachable while publishing (%s); retrying", publication.job_id, exc)
                time.sleep(REDIS_RETRY_SECONDS)

    def _publish(self, publication: Publication) -> str:
        try:
            uri = self._write_and_copy(publication)
        except OSError as exc:
            self.storage_failed(publication, exc)
            return "failed"
        finally:
            shutil.rmtree(publication.snapshot.directory, ignore_errors=True)
        if uri is None:
            return "refused"
        return "recorded" if self._record(publication, uri) else "refused"

    def _write_and_copy(self, publication: Publication) -> str | None:
        """Write the snapshot and copy it into the lease's own directory if the lease still holds (a stale holder
        writes nothing); its URI, or None."""
        p = publication
        local = p.snapshot.write()
        if not self.store.holds(p.job_id, p.attempt, self.executor_id):
            log.warning("job %s: %s refused, not written: this executor no longer holds the job", p.job_id, p.name)
            return None
        return self.artifacts.publish(local, p.tenant, p.job_id, p.attempt, p.name)

    def failed_on_the_loop(self, p: Publication, exc: OSError) -> None:
        """The snapshot itself could not be taken (a GaLore job's model is written on the loop)."""
        self.storage_failed(p, exc)
        if self.metrics:
            self.metrics.record_publication(p.kind, "failed", 0.0)

    def storage_failed(self, p: Publication, exc: OSError) -> None:
        """The artifact could not be written or stored: a result fails its job alone; a checkpoint is reported."""
        if p.is_result:
            log.warning("job %s: adapter not published: %s", p.job_id, exc)
            self.store.fail(p.job_id, JobState.RUNNING,
                            f"job {p.job_id} failed: the trained adapter could not be stored: {exc}",
                            reason=FailureReason.PUBLISH, attempt=p.attempt, executor_id=self.executor_id)
        else:
            log.warning("job %s: checkpoint not saved: %s", p.job_id, exc)
            self.store.append_event(p.job_id, "error", message=f"checkpoint not saved: {exc}")

    def _record(self, p: Publication, uri: str) -> bool:
        """Point the job at its artifact (under the lease); whether the store took it."""
        if p.is_result:
            if self.store.succeed(p.job_id, uri, p.attempt, self.executor_id):
                log.info("job %s succeeded: %s", p.job_id, uri)
                return True
            log.warning("job %s: result refused: this executor no longer holds the job", p.job_id)
            self.delete(p.job_id, uri)
            return False
        evicted = self.store.record_checkpoint(p.job_id, uri, p.attempt, self.executor_id, step=p.step,
                                               keep=p.keep_checkpoints)
        recorded = evicted is not None
        if not recorded:  # the lease moved on between the check and the pointer: nobody will read this copy
            log.warning("job %s: checkpoint at step %d refused: this executor no longer holds the job", p.job_id,
                        p.step)
            evicted = [uri]
        for old in evicted:
            self.delete(p.job_id, old)
        return recorded

    def delete(self, job_id: str, uri: str) -> None:
        try:
            self.artifacts.delete(uri)
        except (OSError, ValueError) as exc:  # left behind: `lorafleet jobs purge` removes the job's whole tree
            log.warning("job %s: could not delete %s: %s", job_id, uri, exc)
