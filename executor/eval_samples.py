"""Evaluation samples (the spec's `eval_samples`): at each checkpoint of a training job, and at its end before its
adapter is published, its prompts completed greedily by its live adapter, written as one `eval_samples` event
(`scheduler/eval_samples.py`).

Every job that checkpoints in one step is sampled in ONE `Generator.generate` batch, on the cohort's own generator
(the one generation serving uses: no second KV pool), so a step waits for at most one batch: up to 8 prompts a job,
each up to its `eval_max_tokens`. A prompt is rendered as the job's dataset renders one (`Tokenizing.prompt`). The
engine leaves training untouched (eval mode, no autograd, no global RNG drawn, the routing restored), so a job trains
bitwise as it would without samples. A failure (a base or adapter the engine does not run, memory) is written into
each job's event instead of samples; it never fails a job or the cohort.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from lorafleet.executor.cohort import Cohort
from lorafleet.scheduler.eval_samples import EVENT, EvalSample, event_data
from lorafleet.scheduler.formats import Tokenizing
from lorafleet.scheduler.store import JobStore

if TYPE_CHECKING:
    from lorafleet.executor.generate import GenerationRequest, Generator

log = logging.getLogger("lorafleet.executor.eval_samples")


def eval_requests(cohort: Cohort, job_ids: list[str]) -> list[GenerationRequest]:
    """One greedy request per prompt of each job, adapter = the job's live adapter, in the jobs' and specs' order."""
    from lorafleet.executor.generate import GenerationRequest, Sampling  # the engine, loaded once used (as serving)

    tokenizing = Tokenizing(cohort.tokenizer)
    requests = []
    for job_id in job_ids:
        job = cohort.jobs[job_id]
        sampling = Sampling(max_tokens=job.spec.eval_max_tokens, temperature=0.0)
        for number, prompt in enumerate(job.spec.eval_samples):
            prompt_ids = tuple(tokenizing.prompt(job.data.fmt, prompt))
            requests.append(GenerationRequest(f"{job_id}/{number}", prompt_ids, adapter=job_id, sampling=sampling))
    return requests


def make_samples(generator: Generator, cohort: Cohort, job_ids: list[str]) -> dict[str, list[EvalSample]]:
    """Job id -> its samples (one per prompt, in the spec's order), all jobs in one generate batch."""
    requests = eval_requests(cohort, job_ids)
    owners = [(job_id, prompt) for job_id in job_ids for prompt in cohort.jobs[job_id].spec.eval_samples]
    samples: dict[str, list[EvalSample]] = {job_id: [] for job_id in job_ids}
    for (job_id, prompt), completion in zip(owners, generator.generate(requests), strict=True):
        text = cohort.tokenizer.decode(list(completion.token_ids), skip_special_tokens=True)
        samples[job_id].append(EvalSample(prompt, text, completion.finish_reason))
    return samples


def record_eval_samples(store: JobStore, generator_for: Callable[[Cohort], Generator], cohort: Cohort,
                        steps: dict[str, int]) -> None:
    """Append each job's `eval_samples` event at its step (`steps`: job id -> the step it checkpointed at): its
    samples, or the reason none were made."""
    try:
        samples = make_samples(generator_for(cohort), cohort, list(steps))
    except Exception as exc:  # the engine's or the device's fault, not the job's: training goes on
        log.warning("eval samples of %s not made: %s", ", ".join(steps), exc)
        for job_id, step in steps.items():
            store.append_event(job_id, EVENT, **event_data(step, error=f"{type(exc).__name__}: {exc}"))
        return
    for job_id, step in steps.items():
        store.append_event(job_id, EVENT, **event_data(step, samples[job_id]))
