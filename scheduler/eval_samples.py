"""The `eval_samples` event: a job's prompts (the spec's `eval_samples`) completed greedily by its adapter at a
checkpoint. The executor writes it (`executor/eval_samples.py`); the gateway's event view, the job page and the CLI
read it. Its data: `step`, and either `samples` (one `EvalSample` per prompt, in the spec's order) or `error` (why
none were made; the job trains on regardless)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

EVENT = "eval_samples"


@dataclass(frozen=True)
class EvalSample:
    prompt: str  # as the tenant wrote it (not the rendered template)
    completion: str  # the generated text, special tokens left out
    finish_reason: str  # "stop" (an end-of-sequence token) or "length" (eval_max_tokens reached)

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def event_data(step: int, samples: list[EvalSample] | None = None, error: str | None = None) -> dict[str, Any]:
    """The event's fields, as `JobStore.append_event` stores them."""
    if error is not None:
        return {"step": step, "error": error}
    return {"step": step, "samples": [sample.to_json() for sample in samples or ()]}


def describe(event: dict[str, Any]) -> str:
    """`Samples at step 4:` then `"prompt" -> "completion"`, a line a sample; or why none were made."""
    if event.get("error"):
        return f"Samples at step {event.get('step')} not made: {event['error']}"
    lines = [f"Samples at step {event.get('step')}:"]
    for sample in event.get("samples") or ():
        lines.append(f"{json.dumps(sample.get('prompt'))} -> {json.dumps(sample.get('completion'))}")
    return "\n".join(lines)
