"""Unit tests of the pure scheduling policy: fakes of fleet state in, decisions out."""

import random
from dataclasses import replace

import pytest

from lorafleet.scheduler.memory import (
    JobSize,
    MemoryCalibration,
    ModelShape,
    auto_dtype,
    calibrate,
    cohort_bytes,
    effective_dtype,
    estimate_activation_bytes,
    estimate_base_bytes,
    estimate_gpu_seconds,
    estimate_job_bytes,
    pass_tokens,
)
from lorafleet.scheduler.policy import (
    Backlog, ExecutorView, PlanConfig, QueuedJob, RunningJob, TenantView, plan,
)
from lorafleet.scheduler.spec import ALL_PROJECTIONS, JobSpec

GiB = 1024**3
LLAMA_8B = ModelShape(4096, 14336, 32, 32, 8, 128256)
KEY_A = "base-a||none|bfloat16"
KEY_B = "base-b||none|bfloat16"


def job(job_id, tenant="t1", key=KEY_A, priority=5, submitted_at=0.0, job_gib=4, base_gib=10, gpu_seconds=200.0,
        tokens_per_step=2048):
    return QueuedJob(job_id, tenant, key, priority, submitted_at, gpu_seconds, tokens_per_step, job_gib * GiB,
                     base_gib * GiB)


def executor(executor_id, total_gib=80, loaded=None, base_gib=10, running=(), alive=True):
    used = (base_gib * GiB if loaded else 0) + sum(r.job_bytes for r in running)
    return ExecutorView(executor_id, total_gib * GiB, total_gib * GiB - used, loaded, base_gib * GiB if loaded else 0,
                        tuple(running), alive)


def running(job_id, tenant="t0", job_gib=4, tokens_per_step=2048):
    return RunningJob(job_id, tenant, job_gib * GiB, tokens_per_step, 200.0)


# ----------------------------------------------------------------------------------------------- memory model


def test_base_bytes_by_quantization_and_dtype():
    params = 8_000_000_000
    assert estimate_base_bytes(params, "none", "bfloat16") == 16_000_000_000
    assert estimate_base_bytes(params, "none", "float32") == 32_000_000_000
    assert estimate_base_bytes(params, "int8", "bfloat16") == 8_000_000_000
    assert estimate_base_bytes(params, "nf4", "bfloat16") == 4_500_000_000
    with pytest.raises(ValueError, match="quantization 'fp8'"):
        estimate_base_bytes(params, "fp8", "bfloat16")
    with pytest.raises(ValueError, match="dtype 'int4'"):
        estimate_base_bytes(params, "none", "int4")


def test_model_shape_counts_llama_8b_params_and_reads_hf_config():
    assert 7.9e9 < LLAMA_8B.num_params() < 8.1e9
    config = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 128256}
    assert ModelShape.from_config(config) == LLAMA_8B
    with pytest.raises(ValueError, match="vocab_size"):
        ModelShape.from_config({k: v for k, v in config.items() if k != "vocab_size"})


def test_job_bytes_grow_with_rank_modules_and_tokens_and_match_spec_fields():
    spec = JobSpec(base_model="m", dataset="d.jsonl")
    default = estimate_job_bytes(LLAMA_8B, spec.adapter.r, spec.adapter.target_modules,
                                 spec.hyperparameters.batch_size, spec.hyperparameters.max_seq_len,
                                 effective_dtype(spec.dtype, "bfloat16"))
    assert estimate_job_bytes(LLAMA_8B, 64, ALL_PROJECTIONS, 4, 512, "bfloat16") > default
    assert estimate_job_bytes(LLAMA_8B, 16, ("q_proj", "v_proj"), 4, 512, "bfloat16") < default
    assert estimate_job_bytes(LLAMA_8B, 16, ALL_PROJECTIONS, 8, 512, "bfloat16") > 1.9 * default * 0.99
    # r=16 on all projections of an 8B is 42M adapter params: 16 bytes each with Adam, ~0.67 GB
    adapter_only = default - estimate_job_bytes(LLAMA_8B, 1, ALL_PROJECTIONS, 4, 512, "bfloat16")
    assert 0.6e9 < adapter_only < 0.7e9
    with pytest.raises(ValueError, match="target module 'c_attn'"):
        estimate_job_bytes(LLAMA_8B, 16, ("c_attn",), 4, 512, "bfloat16")


def test_gpu_seconds_scale_with_tokens_and_parameters():
    assert estimate_gpu_seconds(10_000, 8_000_000_000) == pytest.approx(1.0)
    assert estimate_gpu_seconds(10_000, 70_000_000_000) == pytest.approx(8.75)
    assert estimate_gpu_seconds(20_000, 8_000_000_000, tokens_per_second_at_8b=5_000) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="params"):
        estimate_gpu_seconds(10, 0)


def test_calibrate_jumps_up_at_once_and_decays_down_slowly():
    first = calibrate(MemoryCalibration(), observed_peak=120, predicted=100)
    assert first.factor == pytest.approx(1.2) and first.observations == 1
    assert calibrate(first, observed_peak=150, predicted=100).factor == pytest.approx(1.5)
    lower = calibrate(first, observed_peak=100, predicted=100, smoothing=0.25)
    assert lower.factor == pytest.approx(1.15)
    factor = first
    for _ in range(60):
        factor = calibrate(factor, observed_peak=100, predicted=100)
    assert factor.factor == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="positive"):
        calibrate(first, observed_peak=0, predicted=100)


# ----------------------------------------------------------------------------------------------- plan


def test_a_cohort_in_passes_holds_one_pass_of_activations_not_every_jobs():
    jobs = [RunningJob(f"r{i}", "t0", 1100, 500, activation_bytes=1000, max_seq_len=250) for i in range(3)]
    assert cohort_bytes(jobs, None) == 3 * 1100
    assert cohort_bytes(jobs, 600) == 3 * 100 + 2 * 600  # 2 bytes a token, one pass of 600 tokens
    assert cohort_bytes(jobs, 100) == 3 * 100 + 2 * 250, "a sequence longer than a pass is a pass of its own"
    assert cohort_bytes(jobs, 10_000) == 3 * 1100, "no more than all of the cohort's tokens"
    assert cohort_bytes([], 600) == 0
    shape_args = (LLAMA_8B, 4, 512, "bfloat16")
    assert 0 < estimate_activation_bytes(*shape_args) < estimate_job_bytes(LLAMA_8B, 16, ALL_PROJECTIONS, 4, 512,
                                                                           "bfloat16")


def test_an_executor_takes_larger_passes_where_memory_allows():
    assert pass_tokens(8192, 100 * 2**20, 2**20) == 8192, "never fewer tokens than the planner counted on"
    assert pass_tokens(8192, 20_000 * 2**20, 2**20) == 20_000
    assert pass_tokens(8192, -5.0, 2**20) == 8192 and pass_tokens(8192, 10 * GiB, 0) == 8192


def test_memory_borrowed_for_larger_passes_than_planned_is_not_counted_as_used():
    """Executors report the raw peak and the pass it was measured in; the planner prices the pass it planned."""
    per_token = 2**20
    running = tuple(RunningJob(f"r{i}", "t1", GiB + 4096 * per_token, 4096, 0.0, 4096 * per_token, 512)
                    for i in range(4))
    base = 10 * GiB
    planned = 8192
    at_planned_peak = base + cohort_bytes(running, planned)
    at_borrowed_peak = base + cohort_bytes(running, 16_384)
    newcomer = QueuedJob("new", "t1", KEY_A, 5, 0.0, 1.0, 4096, GiB + 4096 * per_token, base, 4096 * per_token, 512)
    total = int((at_planned_peak + cohort_bytes([newcomer], planned) + GiB) / 0.92)  # room for one more job
    assert total < at_borrowed_peak / 0.92 + cohort_bytes([newcomer], planned), "borrowed, it would look full"

    def view(peak: int, pass_tokens_: int) -> ExecutorView:
        return ExecutorView("e", total, total - peak, KEY_A, base, running, max_pass_tokens=planned,
                            pass_tokens=pass_tokens_)

    tenants = [TenantView("t1")]
    assert [a.job_id for a in plan([newcomer], [view(int(at_borrowed_peak), 16_384)], tenants, 0.0)] == ["new"]
    assert plan([newcomer], [view(int(at_borrowed_peak), planned)], tenants, 0.0) == [], \
        "measured at the planned pass, the same peak leaves no room"


def test_one_dtype_rule_for_planner_and_executor():
    assert auto_dtype("cuda", native_bf16=True) == "bfloat16"
    assert auto_dtype("cuda", native_bf16=False) == "float32"
    assert auto_dtype("cpu", native_bf16=True) == "float32", "a CPU runs bf16 only when asked"
    assert effective_dtype("auto", "float32") == "float32" and effective_dtype("bfloat16", "float32") == "bfloat16"
    with pytest.raises(ValueError, match="float16"):
        effective_dtype("float16", "float32")


def test_an_auto_job_is_priced_in_the_dtype_each_executor_will_run_it_in():
    """dtype auto on an fp32 executor costs fp32 activations: the planner must not price it as bf16."""
    sizes = {d: JobSize(estimate_job_bytes(LLAMA_8B, 16, ALL_PROJECTIONS, 4, 512, d),
                        estimate_activation_bytes(LLAMA_8B, 4, 512, d), estimate_base_bytes(LLAMA_8B.num_params(),
                                                                                             "none", d))
             for d in ("bfloat16", "float32")}
    bf16 = sizes["bfloat16"]
    job_ = QueuedJob("auto-job", "t1", KEY_A, 5, 0.0, 1.0, 2048, bf16.job_bytes, bf16.base_bytes,
                     bf16.activation_bytes, 512, "auto", sizes=sizes)
    room_for_bf16 = int((bf16.base_bytes + bf16.job_bytes) / 0.92) + GiB
    fp32_gpu = ExecutorView("fp32", room_for_bf16, room_for_bf16, dtypes=frozenset({"float32"}),
                            auto_dtype="float32")
    bf16_gpu = replace(fp32_gpu, executor_id="bf16", dtypes=frozenset({"bfloat16", "float32"}),
                       auto_dtype="bfloat16")
    tenants = [TenantView("t1")]
    assert plan([job_], [fp32_gpu], tenants, 0.0) == [], "in fp32 it does not fit where it fits in bf16"
    assert [a.executor_id for a in plan([job_], [bf16_gpu, fp32_gpu], tenants, 0.0)] == ["bf16"]


def _llama_8b_job(i: int, base: int) -> QueuedJob:
    """A 4x512, r=16, all-projections 8B job, sized as the scheduler sizes it."""
    return QueuedJob(f"j{i:02d}", "t1", KEY_A, 5, float(i), 100.0, 2048,
                     estimate_job_bytes(LLAMA_8B, 16, ALL_PROJECTIONS, 4, 512, "bfloat16"), base,
                     estimate_activation_bytes(LLAMA_8B, 4, 512, "bfloat16"), 512)


def test_an_executor_in_passes_takes_a_full_cohort_of_8b_jobs():
    """The capacity bench fits 16 8B 4x512 jobs in 62 GiB with passes of 8,192 tokens; the planner must see that,
    for an idle executor and for a running cohort that reports the peak such a cohort has."""
    base = estimate_base_bytes(LLAMA_8B.num_params(), "none", "bfloat16")
    queue = [_llama_8b_job(i, base) for i in range(20)]
    tenants = [TenantView("t1")]

    def placed(passes, running=()):
        used = base + cohort_bytes(running, passes) if running else 0
        gpu = ExecutorView("gpu", 80 * GiB, 80 * GiB - used, KEY_A if running else None, base if running else 0,
                           tuple(running), max_pass_tokens=passes)
        return len(plan(queue, [gpu], tenants, 100.0))

    assert placed(None) == 6, "without passes every job's activations count"
    assert placed(8192) == 16, "in passes only one pass's do: the cohort limit is what stops it"
    cohort = [RunningJob(f"r{i}", "t0", j.job_bytes, j.tokens_per_step, 10.0, j.activation_bytes, 512)
              for i, j in enumerate(queue[:10])]
    assert placed(8192, cohort) == 6
    assert placed(None, cohort[:4]) == 2


def test_a_failed_small_job_does_not_hide_a_big_one_that_fits_a_cohort_in_passes():
    """Room only shrinks in a round, so the planner skips jobs bigger than one that failed. In passes a job with
    big activations but little adapter state can need less than a smaller job: it must still be tried."""
    per_token = 2**20
    cohort = [RunningJob(f"r{i}", "t0", GiB + 2048 * per_token, 2048, 10.0, 2048 * per_token, 512) for i in range(4)]
    used = 10 * GiB + cohort_bytes(cohort, 4096)  # 4 GiB of adapter state, one pass of 4,096 tokens: 4 GiB
    gpu = ExecutorView("gpu", 22 * GiB, 22 * GiB - used, KEY_A, 10 * GiB, tuple(cohort), max_pass_tokens=4096)
    room = int(22 * GiB * 0.92) - used
    assert 1 * GiB < room < 3 * GiB
    state_heavy = QueuedJob("state-heavy", "t1", KEY_A, 9, 0.0, 10.0, 512, 3 * GiB, 10 * GiB, 0, 512)
    activation_heavy = QueuedJob("activation-heavy", "t1", KEY_A, 1, 1.0, 10.0, 4096,
                                 GiB + 4096 * per_token, 10 * GiB, 4096 * per_token, 512)
    assert activation_heavy.job_bytes > state_heavy.job_bytes
    decisions = plan([state_heavy, activation_heavy], [gpu], [TenantView("t1")], 100.0)
    assert [a.job_id for a in decisions] == ["activation-heavy"]


def test_a_job_goes_only_where_its_dtype_computes_natively():
    pre_ampere = replace(executor("pre-ampere", total_gib=40), dtypes=frozenset({"float32"}))
    ampere = replace(executor("ampere", total_gib=80), dtypes=frozenset({"bfloat16", "float32"}))
    bf16 = replace(job("bf16"), dtype="bfloat16")
    tenants = [TenantView("t1")]
    # best fit alone would pick the tighter 40 GiB executor
    assert [a.executor_id for a in plan([bf16], [pre_ampere, ampere], tenants, 0.0)] == ["ampere"]
    assert plan([bf16], [pre_ampere], tenants, 0.0) == []
    assert [a.executor_id for a in plan([job("auto")], [pre_ampere], tenants, 0.0)] == ["pre-ampere"], \
        "auto runs anywhere: the executor picks"
    unreported = executor("unreported")
    assert [a.executor_id for a in plan([bf16], [unreported], tenants, 0.0)] == ["unreported"]


def test_config_and_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="packing"):
        PlanConfig(packing="best")
    with pytest.raises(ValueError, match="duplicate job_id"):
        plan([job("j1"), job("j1")], [executor("e1")], {}, 0.0)
    with pytest.raises(ValueError, match="tenant 't1': weight"):
        plan([job("j1")], [executor("e1")], [TenantView("t1", weight=0)], 0.0)


def test_prefers_idle_executor_that_holds_the_base():
    fleet = [executor("e1"), executor("e2", loaded=KEY_B), executor("e3", loaded=KEY_A), executor("e4")]
    for packing in ("optimal-fit", "fast-fit"):
        [assignment] = plan([job("j1")], fleet, {}, 0.0, PlanConfig(packing=packing))
        assert (assignment.executor_id, assignment.compat_key) == ("e3", KEY_A)


def test_reloads_an_idle_executor_whose_base_nobody_wants_first():
    fleet = [executor("e1", loaded=KEY_B), executor("e2", loaded="base-c||none|bfloat16")]
    queue = [job("j1"), job("j2", key=KEY_B, submitted_at=1.0)]
    decisions = {a.job_id: a.executor_id for a in plan(queue, fleet, {}, 0.0)}
    assert decisions == {"j1": "e2", "j2": "e1"}


def test_hot_joins_a_running_cohort_and_never_mixes_keys():
    fleet = [executor("busy-b", loaded=KEY_B, running=[running("r1")]),
             executor("busy-a", loaded=KEY_A, running=[running("r2")])]
    decisions = plan([job("j1"), job("j2", key=KEY_B), job("j3", key="other")], fleet, {}, 0.0)
    assert {(a.job_id, a.executor_id) for a in decisions} == {("j1", "busy-a"), ("j2", "busy-b")}


def test_spreads_to_an_idle_executor_holding_the_base_before_filling_a_cohort():
    fleet = [executor("cohort", loaded=KEY_A, running=[running("r1")]), executor("warm", loaded=KEY_A)]
    [assignment] = plan([job("j1")], fleet, {}, 0.0)
    assert assignment.executor_id == "warm"


def test_joins_the_cohort_below_the_token_target_first():
    big = [running(f"r{i}", job_gib=1, tokens_per_step=4096) for i in range(3)]
    fleet = [executor("full-ish", loaded=KEY_A, running=big),
             executor("small", loaded=KEY_A, running=[running("s1", job_gib=1, tokens_per_step=1024)])]
    [assignment] = plan([job("j1", job_gib=1)], fleet, {}, 0.0, PlanConfig(target_cohort_tokens=8192))
    assert assignment.executor_id == "small"


def test_skips_dead_executors():
    assert plan([job("j1")], [executor("dead", alive=False)], {}, 0.0) == []


def test_a_full_fleet_gets_no_assignments():
    fleet = [executor("e1", total_gib=24, loaded=KEY_A, running=[running("r1", job_gib=11)])]
    assert plan([job("j1", job_gib=4)], fleet, {}, 0.0, PlanConfig(memory_fraction=0.9)) == []


def test_optimal_fit_keeps_big_gpus_free_for_big_jobs():
    fleet = [executor("big", total_gib=80), executor("small", total_gib=24)]
    config = PlanConfig(packing="optimal-fit")
    [first] = plan([job("small-job", job_gib=4, base_gib=10)], fleet, {}, 0.0, config)
    assert first.executor_id == "small"
    trivial = plan([job("small-job", job_gib=4, base_gib=10)], fleet, {}, 0.0, PlanConfig(packing="trivial"))
    assert trivial[0].executor_id == "big"


def _random_world(rng, num_jobs=300, num_executors=12):
    keys = [f"base-{i}||none|bfloat16" for i in range(4)]
    base_gib = {key: rng.choice((3, 10, 16, 40)) for key in keys}
    queue = [job(f"j{i}", tenant=f"t{rng.randrange(6)}", key=(key := rng.choice(keys)), priority=rng.randrange(10),
                 submitted_at=rng.uniform(0, 1000), job_gib=rng.choice((1, 2, 5, 11, 20)), base_gib=base_gib[key],
                 tokens_per_step=rng.choice((512, 2048, 8192)))
             for i in range(num_jobs)]
    fleet = []
    for i in range(num_executors):
        total = rng.choice((24, 48, 80))
        state = rng.random()
        if state < 0.3:
            fleet.append(executor(f"e{i:02d}", total))
        elif state < 0.5:
            key = rng.choice(keys)
            fleet.append(executor(f"e{i:02d}", total, loaded=key, base_gib=base_gib[key]))
        else:
            key = rng.choice(keys)
            members = [running(f"r{i}-{n}", job_gib=1) for n in range(rng.randrange(1, 4))]
            if base_gib[key] + len(members) < total:
                fleet.append(executor(f"e{i:02d}", total, loaded=key, base_gib=base_gib[key], running=members))
    tenants = [TenantView(f"t{i}", weight=rng.choice((1, 2)), max_running=rng.choice((None, 3, 10)),
                          running=rng.randrange(3)) for i in range(6)]
    return queue, fleet, tenants


@pytest.mark.parametrize("packing", ["optimal-fit", "fast-fit", "trivial"])
@pytest.mark.parametrize("seed", range(8))
def test_memory_cohort_and_quota_limits_hold_on_random_fleets(packing, seed):
    rng = random.Random(seed)
    queue, fleet, tenants = _random_world(rng)
    factors = {job.compat_key: rng.uniform(1.0, 1.3) for job in queue}
    config = PlanConfig(packing=packing, max_cohort_jobs=6, memory_fraction=0.9, memory_factors=factors)
    decisions = plan(queue, fleet, tenants, 2000.0, config)
    assert decisions
    jobs = {j.job_id: j for j in queue}
    assert len({a.job_id for a in decisions}) == len(decisions)
    per_tenant = {t.name: t.running for t in tenants}
    for view in fleet:
        mine = [jobs[a.job_id] for a in decisions if a.executor_id == view.executor_id]
        if not mine:
            continue
        key = mine[0].compat_key
        assert {j.compat_key for j in mine} == {key}
        if view.running:
            assert view.loaded_compat_key == key
        assert len(mine) + len(view.running) <= 6
        factor = factors[key]
        base = view.loaded_base_bytes if view.loaded_compat_key == key else mine[0].base_bytes * factor
        used = base + sum(r.job_bytes for r in view.running) + sum(j.job_bytes * factor for j in mine)
        assert used <= 0.9 * view.total_bytes
    for assignment in decisions:
        per_tenant[jobs[assignment.job_id].tenant] += 1
    for tenant in tenants:
        if tenant.max_running is not None:
            assert per_tenant[tenant.name] <= max(tenant.max_running, tenant.running)


def test_same_inputs_same_plan_whatever_their_order():
    queue, fleet, tenants = _random_world(random.Random(3))
    first = plan(queue, fleet, tenants, 2000.0)
    shuffled = random.Random(1)
    for _ in range(3):
        queue, fleet, tenants = list(queue), list(fleet), list(tenants)
        for items in (queue, fleet, tenants):
            shuffled.shuffle(items)
        assert plan(queue, fleet, tenants, 2000.0) == first


@pytest.mark.parametrize("seed", range(6))
def test_a_backlog_kept_job_by_job_plans_like_the_same_jobs_as_a_list(seed):
    """The scheduler keeps its backlog between rounds, adding and removing jobs as the queue changes: whatever the
    order of those changes, it plans exactly as the list of the jobs left (reservations included: old jobs)."""
    rng = random.Random(seed)
    queue, fleet, tenants = _random_world(rng)
    queue = [replace(j, submitted_at=rng.uniform(0, 8000)) for j in queue]
    gone = [replace(j, job_id=f"{j.job_id}-gone") for j in rng.sample(queue, 100)]
    backlog = Backlog()
    for j in rng.sample(queue + gone, len(queue) + len(gone)):
        backlog.add(j)
    for j in rng.sample(gone, len(gone)):
        assert backlog.discard(j.job_id) is j
    assert backlog.discard("never-queued") is None and len(backlog) == len(queue)
    for now in (100.0, 5000.0, 9000.0):
        assert plan(backlog, fleet, tenants, now) == plan(queue, fleet, tenants, now)
    skipped = {"t1", "t4"}
    assert plan(backlog, fleet, tenants, 9000.0, skip_tenants=skipped) == \
        plan([j for j in queue if j.tenant not in skipped], fleet, tenants, 9000.0)


def test_quota_caps_a_tenants_running_jobs():
    fleet = [executor(f"e{i}") for i in range(4)]
    queue = [job(f"j{i}") for i in range(10)]
    decisions = plan(queue, fleet, [TenantView("t1", max_running=3, running=2)], 0.0)
    assert len(decisions) == 1
    assert plan(queue, fleet, [TenantView("t1", max_running=3, running=3)], 0.0) == []


def _run_rounds(queue_for, tenants, rounds, fleet_size=4, config=PlanConfig(max_cohort_jobs=1), seconds=1.0):
    """Every round each executor runs one job for `seconds` of GPU time; returns GPU seconds per tenant."""
    used = {t.name: 0.0 for t in tenants}
    started = []
    for round_index in range(rounds):
        views = [replace(t, gpu_seconds=used[t.name]) for t in tenants]
        decisions = plan(queue_for(round_index, started), [executor(f"e{i}") for i in range(fleet_size)], views,
                         float(round_index), config)
        for decision in decisions:
            started.append(decision.job_id)
            used[decision.job_id.split(":")[0]] += seconds
    return used, started


def test_gpu_time_converges_to_tenant_weights():
    tenants = [TenantView("a", weight=1), TenantView("b", weight=3), TenantView("c", weight=4)]

    def backlog(round_index, started):  # every tenant always has more work than the fleet
        return [job(f"{t.name}:{round_index}:{n}", tenant=t.name, gpu_seconds=1.0) for t in tenants for n in range(8)]

    used, _ = _run_rounds(backlog, tenants, rounds=200)
    total = sum(used.values())
    assert used["a"] / total == pytest.approx(1 / 8, abs=0.02)
    assert used["b"] / total == pytest.approx(3 / 8, abs=0.02)
    assert used["c"] / total == pytest.approx(4 / 8, abs=0.02)


def test_priority_orders_a_tenants_jobs_and_aging_lets_low_priority_run():
    config = PlanConfig(max_cohort_jobs=1, aging_seconds=10.0)
    low = job("t1:low", priority=0, submitted_at=0.0)

    def stream(round_index, started):  # a new priority-9 job every round; one executor
        queue = [job(f"t1:high{n}", priority=9, submitted_at=float(n)) for n in range(round_index + 1)]
        return [j for j in queue + [low] if j.job_id not in started]

    tenants = [TenantView("t1")]
    _, started = _run_rounds(stream, tenants, rounds=200, fleet_size=1, config=config)
    assert started[0] == "t1:high0"
    assert "t1:low" in started
    # it runs once 9 levels of aging (90 s) outweigh the newest priority-9 job's lead
    assert 85 <= started.index("t1:low") <= 95


def test_a_starving_big_job_reserves_an_executor_until_it_fits():
    config = PlanConfig(reserve_after_seconds=100.0, max_cohort_jobs=8)
    big = job("big", tenant="t2", job_gib=60, base_gib=10, submitted_at=0.0)
    members = [running(f"r{n}", job_gib=5) for n in range(4)]
    fleet = [executor("e1", loaded=KEY_A, running=members)]
    smalls = [job(f"small{n}", tenant="t1", job_gib=5, submitted_at=1.0) for n in range(4)]
    tenants = [TenantView("t1"), TenantView("t2")]
    # before the deadline small jobs backfill the room the big one cannot use
    assert {a.job_id for a in plan([big] + smalls, fleet, tenants, 50.0, config)} == {f"small{n}" for n in range(4)}
    # after it, the executor is held back so its cohort drains ...
    assert plan([big] + smalls, fleet, tenants, 150.0, config) == []
    # ... and the big job takes it once there is room
    drained = [executor("e1", loaded=KEY_A)]
    assert [a.job_id for a in plan([big] + smalls, drained, tenants, 160.0, config)] == ["big"]
