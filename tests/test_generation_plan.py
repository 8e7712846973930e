"""The generation pool in the memory plan (issue 18): an executor serving its base holds a page pool beside the
cohort (executor/serving.py), sized by the memory model (`memory.generation_pool_bytes`), and the planner reserves
those bytes (`JobSize.pool_bytes`): a cohort and its pool fit the budget, on random fleets as on a full one, and the
pool the executor allocates is the one the plan reserved. Pure planner tests, and the executor's sizing on tiny
models on the CPU (what the pool takes on a GPU is planned here, not measured: no GPU in these tests)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from helpers_models import alpaca_rows, build_tiny_model, single_torch_thread, write_jsonl  # noqa: F401
from lorafleet.executor.cohort import Cohort
from lorafleet.executor.generate import Generator
from lorafleet.executor.serving import IDLE, GenerationServer, pool_bytes
from lorafleet.scheduler.memory import GENERATION_POOL_TOKENS, ModelShape, generation_pool_bytes
from lorafleet.scheduler.policy import ExecutorView, PlanConfig, TenantView, plan
from lorafleet.scheduler.records import ExecutorHeartbeat
from lorafleet.scheduler.spec import parse_spec
from lorafleet.scheduler.submission import plan_for
from test_policy import GiB, KEY_A, KEY_B, _random_world, job

LLAMA_8B = ModelShape(4096, 14336, 32, 32, 8, 128256, family="llama")


# ----------------------------------------------------------------------------------------------- the memory model


def test_the_pool_is_an_idle_batchs_kv_and_a_quarter_for_adapters():
    """8B Llama in bf16: K and V of 32 layers x 8 heads x 128 per token (128 KiB), for the idle budget's tokens
    generated and as many prompt tokens, and a quarter more: 5 GiB."""
    assert GENERATION_POOL_TOKENS == 2 * IDLE.max_tokens
    assert generation_pool_bytes(LLAMA_8B, "bfloat16") == 128 * 1024 * 2 * IDLE.max_tokens * 5 // 4 == 5 * GiB
    assert generation_pool_bytes(LLAMA_8B, "float32") == 10 * GiB
    assert generation_pool_bytes(replace(LLAMA_8B, family="gpt2"), "bfloat16") == 0, "a base the engine refuses"


def test_a_galore_plan_reserves_no_pool_and_a_lora_plan_on_a_served_base_does(tmp_path):
    model = build_tiny_model(tmp_path / "llama", "llama")
    spec = {"base_model": str(model), "dataset": "d", "hyperparameters": {"max_steps": 4}}
    lora = plan_for(parse_spec(spec), model, 1000)
    galore = plan_for(parse_spec({**spec, "adapter": {"type": "galore"}}), model, 1000)
    lopa = plan_for(parse_spec({**spec, "adapter": {"type": "lopa"}}), model, 1000)
    assert lora.size("float32").pool_bytes > 0 and lopa.size("float32").pool_bytes == lora.size("float32").pool_bytes
    assert galore.size("float32").pool_bytes == 0, "a GaLore job's executor serves no generation"


# ----------------------------------------------------------------------------------------------- the executor's pool


@pytest.mark.parametrize("family, quantization, dtype", [
    ("llama", "none", "float32"), ("qwen3", "none", "bfloat16"), ("mistral", "nf4", "float32")])
def test_the_executors_pool_is_the_bytes_the_plan_reserved(tmp_path, family, quantization, dtype):
    """The plan of a job on the base (made at submission from its files) reserves what the executor's pool sizing
    gives for the loaded cohort, and the engine allocates that, less the part of a page left over."""
    model = build_tiny_model(tmp_path / family, family)
    spec = parse_spec({"base_model": str(model), "dataset": "d", "quantization": quantization, "dtype": dtype,
                       "hyperparameters": {"max_steps": 4}})
    reserved = plan_for(spec, model, 1000).size(dtype).pool_bytes
    cohort = Cohort(model, quantization=quantization, dtype=dtype)
    assert reserved > 0 and pool_bytes(cohort.model) == reserved
    server = GenerationServer(None, "e1", None, tmp_path)
    assert server.pool_allocated_bytes() == 0, "no pool before the first request"
    generator = server.generator_for(cohort)
    allocated = generator.pool.buffer.numel() * generator.pool.buffer.element_size()
    assert reserved - generator.pool.page_bytes < allocated <= reserved
    assert server.pool_allocated_bytes() == allocated, "what the heartbeat reports"
    assert isinstance(generator, Generator) and generator.pool.buffer.dtype == getattr(torch, dtype)


def test_the_heartbeat_carries_the_allocated_pool():
    beat = ExecutorHeartbeat("e1", total_bytes=80 * GiB, peak_bytes=30 * GiB, pool_bytes=5 * GiB)
    assert ExecutorHeartbeat.from_hash("e1", beat.to_hash()).pool_bytes == 5 * GiB


# ----------------------------------------------------------------------------------------------- the plan


def jobs_of(pool_gib: float, count: int = 12, job_gib: int = 10, key: str = KEY_A):
    return [replace(job(f"j{i}", key=key, job_gib=job_gib, submitted_at=float(i)), pool_bytes=int(pool_gib * GiB))
            for i in range(count)]


def placed(queue, executor: ExecutorView) -> int:
    return len(plan(queue, [executor], [TenantView("t1")], 100.0, PlanConfig(memory_fraction=0.9)))


def test_a_full_cohort_leaves_room_for_its_generation_pool():
    """80 GiB at 0.9: 72 GiB. A 10 GiB base and 10 GiB jobs: six fit; with a 6 GiB pool beside them, five."""
    idle = ExecutorView("gpu", 80 * GiB, 80 * GiB)
    assert placed(jobs_of(0), idle) == 6
    assert placed(jobs_of(6), idle) == 5


def test_an_executor_holding_the_base_counts_its_pool_once_made_or_not():
    """An idle executor that holds the base: its pool allocated (in its measured memory and its heartbeat) is not
    counted twice; not made yet (nothing served so far), it is still reserved."""
    pool = 6 * GiB
    made = ExecutorView("gpu", 80 * GiB, 80 * GiB - 10 * GiB - pool, KEY_A, 10 * GiB, pool_bytes=pool,
                        pool_allocated_bytes=pool)
    not_made = ExecutorView("gpu", 80 * GiB, 80 * GiB - 10 * GiB, KEY_A, 10 * GiB)
    assert placed(jobs_of(6), made) == 5
    assert placed(jobs_of(6), not_made) == 5


def test_the_pool_of_a_base_being_replaced_is_not_foreign_memory():
    """An idle executor holding another base and its pool: loading ours frees both, so only memory that is neither
    counts against the new cohort (here 4 GiB of another process's)."""
    other = ExecutorView("gpu", 80 * GiB, 80 * GiB - 10 * GiB - 6 * GiB - 4 * GiB, KEY_B, 10 * GiB, pool_bytes=6 * GiB,
                         pool_allocated_bytes=6 * GiB)
    assert placed(jobs_of(6), other) == 5  # (72 - 4 foreign - 10 base - 6 pool) // 10


@pytest.mark.parametrize("packing", ["optimal-fit", "fast-fit", "trivial"])
@pytest.mark.parametrize("seed", range(6))
def test_a_cohort_plus_its_pool_fit_the_budget_on_random_fleets(packing, seed):
    """test_policy's random fleets, each base with a pool (some 0: a base the engine does not run); executors that
    hold a base report its pool made, reserved but not made, or not known yet (a view from before pools were
    planned). Whatever was assigned, base + pool + cohort stays within the usable memory."""
    rng = random.Random(seed)
    queue, fleet, tenants = _random_world(rng)
    pool = {key: rng.choice((0, 2, 5)) * GiB for key in {j.compat_key for j in queue}}
    queue = [replace(j, pool_bytes=pool[j.compat_key]) for j in queue]
    fleet = [_with_pool(view, pool, rng) for view in fleet]
    factors = {key: rng.uniform(1.0, 1.3) for key in pool}
    config = PlanConfig(packing=packing, max_cohort_jobs=6, memory_fraction=0.9, memory_factors=factors)
    decisions = plan(queue, fleet, tenants, 2000.0, config)
    assert decisions
    jobs = {j.job_id: j for j in queue}
    for view in fleet:
        mine = [jobs[a.job_id] for a in decisions if a.executor_id == view.executor_id]
        if not mine:
            continue
        key, factor = mine[0].compat_key, factors[mine[0].compat_key]
        base = view.loaded_base_bytes if view.loaded_compat_key == key else mine[0].base_bytes * factor
        cohort = sum(r.job_bytes for r in view.running) + sum(j.job_bytes * factor for j in mine)
        assert base + pool[key] + cohort <= 0.9 * view.total_bytes, view.executor_id


def _with_pool(view: ExecutorView, pool: dict[str, int], rng: random.Random) -> ExecutorView:
    """The view with its base's pool made (in its measured memory), reserved only, or unknown (0)."""
    if view.loaded_compat_key is None:
        return view
    reserved = pool.get(view.loaded_compat_key, 0)
    state = rng.choice(("made", "reserved", "unknown"))
    if state == "made":
        return replace(view, free_bytes=max(0, view.free_bytes - reserved), pool_bytes=reserved,
                       pool_allocated_bytes=reserved)
    return replace(view, pool_bytes=reserved if state == "reserved" else 0)
