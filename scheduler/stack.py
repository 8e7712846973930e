"""The pieces of the all-in-one local stack that `lorafleet up` runs, as small functions other processes can add to.

Today: embedded Redis (unless REDIS_URL is set), one Celery worker serving the submission API, two demo tenants with
small datasets and a tiny random base model, sample jobs submitted through the public task names.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

from celery import Celery

from lorafleet.scheduler import config, keys
from lorafleet.scheduler.acl import TenantCredentials
from lorafleet.scheduler.client import LorafleetClient, make_celery
from lorafleet.scheduler.redis_server import RedisServer, start_redis_server, write_private
from lorafleet.scheduler.store import JobStore

DEMO_TENANTS = {"demo-alice": "alpaca_demo.jsonl", "demo-bob": "chat_demo.jsonl"}


@dataclass
class Stack:
    redis_url: str
    redis: Optional[RedisServer] = None  # None when REDIS_URL points at a Redis we do not own
    processes: list[subprocess.Popen] = field(default_factory=list)
    logs: dict[int, Path] = field(default_factory=dict)  # pid -> the log file of that process

    def stop(self) -> None:
        """Stop processes newest first (workers finish their current task on SIGTERM), then Redis."""
        for process in reversed(self.processes):
            process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.redis is not None:
            self.redis.stop()
            config.redis_url_file().unlink(missing_ok=True)


class ChildExited(RuntimeError):
    """A process of the stack ended before the demo did; the message names it and the last line of its log."""


def start_redis() -> Stack:
    """Use REDIS_URL if set, else start the embedded Redis and publish its URL for other lorafleet commands."""
    if os.environ.get("REDIS_URL"):
        return Stack(redis_url=os.environ["REDIS_URL"])
    server = start_redis_server(config.embedded_redis_dir())
    write_private(config.redis_url_file(), server.url)
    return Stack(redis_url=server.url, redis=server)


def role_url(stack: Stack, role: str) -> str:
    """The embedded server's URL for a role's own user; with REDIS_URL, that URL (its owner set up the users)."""
    return stack.redis.role_url(role) if stack.redis is not None else stack.redis_url


def child_env(stack: Stack, role: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        REDIS_URL=role_url(stack, role),
        LORAFLEET_STATE_DIR=str(config.state_dir()),
        LORAFLEET_DATA_ROOT=str(config.data_root()),
        LORAFLEET_ARTIFACT_DIR=str(config.artifact_dir()),
    )
    return env


def private_log_dir() -> Path:
    """<state dir>/logs, readable by the operator only: the logs hold every tenant's job details."""
    path = config.state_dir() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def start_worker(stack: Stack, timeout: float = 60.0) -> Celery:
    """Start a Celery worker serving the lorafleet.* tasks; return a client app once it answers a ping."""
    log_dir = private_log_dir()
    log_path = log_dir / "worker.log"
    with open(log_path, "ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-P", "-m", "celery", "-A", "lorafleet.scheduler.tasks", "worker", "--pool=solo",
             "--loglevel=INFO", "--without-gossip", "--without-mingle", "-n", f"lorafleet-{os.getpid()}@%h"],
            env={**child_env(stack, "worker"), "LORAFLEET_METRICS_PORT": "0", "LORAFLEET_METRICS_ADDR": "127.0.0.1"},
            stdout=log, stderr=subprocess.STDOUT,
        )
    stack.processes.append(worker)
    stack.logs[worker.pid] = log_path
    app = make_celery(stack.redis_url, name="lorafleet-up")
    deadline = time.monotonic() + timeout
    while not app.control.ping(timeout=0.5):
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the Celery worker did not start; see {log_path}")
    return app


def start_process(stack: Stack, name: str, args: list[str]) -> subprocess.Popen:
    """Start `lorafleet <args>` as a child of the stack with the Redis user of role `name` (scheduler, executor),
    logging to <state dir>/logs/<name>.log."""
    log_dir = private_log_dir()
    with open(log_dir / f"{name}.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", "lorafleet.scheduler.cli", *args],
            env=child_env(stack, name), stdout=log, stderr=subprocess.STDOUT,
        )
    stack.processes.append(process)
    stack.logs[process.pid] = log_dir / f"{name}.log"
    return process


def exit_message(stack: Stack, process: subprocess.Popen) -> str:
    """'<name> exited with <code>: <its last log line>': a child's own `Error: ...` line says why (a taken port)."""
    log = stack.logs[process.pid]
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    last = lines[-1].removeprefix("Error: ") if lines else "no output"
    return f"{log.stem} exited with {process.returncode}: {last} (log: {log})"


def wait_for_leader(stack: Stack, scheduler: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait until a scheduler holds the leader lock (ours, or one already serving REDIS_URL); ChildExited when ours
    ends first (its port was taken, say), so that `up` stops at once with its reason."""
    store = JobStore.from_url(stack.redis_url)
    deadline = time.monotonic() + timeout
    while not store.r.exists(keys.SCHEDULER_LEADER):
        if scheduler.poll() is not None:
            raise ChildExited(exit_message(stack, scheduler))
        if time.monotonic() > deadline:
            raise ChildExited(f"no scheduler took the leader lock within {timeout:.0f} s "
                              f"(log: {stack.logs[scheduler.pid]})")
        time.sleep(0.1)


def wait_for_jobs(stack: Stack, job_ids: list[str], on_update, timeout: float = 900.0) -> list[dict]:
    """Poll the store until every job is finished; call on_update(jobs) after each poll; return the final views."""
    store = JobStore.from_url(stack.redis_url)
    deadline = time.monotonic() + timeout
    while True:
        jobs = [store.get_job(job_id, with_spec=False) for job_id in job_ids]
        on_update(jobs)
        if all(job["state"] in keys.TERMINAL_STATES for job in jobs):
            return jobs
        for process in stack.processes:
            if process.poll() is not None:
                raise ChildExited(exit_message(stack, process))
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs not finished after {timeout:.0f} s")
        time.sleep(0.5)


def write_demo_base_model(path: Path) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with a byte-level BPE tokenizer, so the demo needs no download."""
    if (path / "config.json").is_file():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [resources.files("lorafleet.scheduler").joinpath("samples", f).read_text() for f in DEMO_TENANTS.values()]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    model_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    LlamaForCausalLM(model_config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(path)
    return path


def ensure_demo_tenant(store: JobStore, name: str) -> TenantCredentials:
    """Create the tenant, or give the existing one a fresh token and broker password; return its credentials."""
    try:
        _, token = store.create_tenant(name, weight=1.0, max_queued=20, max_running=2)
    except ValueError:
        token = store.rotate_token(name)
    return store.issue_credentials(name, token)


def seed_demo(stack: Stack) -> list[dict]:
    """Two demo tenants, a dataset each, and three sample jobs submitted through the public Celery API."""
    store = JobStore.from_url(stack.redis_url)
    store.ensure_schema()
    base_model = write_demo_base_model(config.state_dir() / "models" / "tiny-llama")
    jobs = []
    for i, (tenant, sample) in enumerate(DEMO_TENANTS.items()):
        credentials = ensure_demo_tenant(store, tenant)
        area = config.data_root() / tenant
        area.mkdir(parents=True, exist_ok=True)
        dataset = area / sample
        dataset.write_text(resources.files("lorafleet.scheduler").joinpath("samples", sample).read_text())
        client = LorafleetClient(credentials.broker_url, credentials.token)  # as the tenant itself would
        try:
            for r in (4, 8)[: 2 - i]:
                spec = {
                    "name": f"{Path(sample).stem}-r{r}",
                    "base_model": str(base_model),
                    "dataset": f"{tenant}/{sample}",
                    "adapter": {"type": "lora", "r": r, "lora_alpha": 2 * r},
                    "hyperparameters": {"max_steps": 20, "batch_size": 2, "max_seq_len": 384, "learning_rate": 1e-2},
                }
                jobs.append(client.submit(spec))
        finally:
            client.close()
    return jobs
