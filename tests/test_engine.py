"""Cohort engine, fp32 on the CPU: packing, cohort invariance, PEFT equivalence, NOLA, fault isolation, join/leave."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers_models import (  # noqa: F401 (fixtures: single_torch_thread is autouse, llama)
    FAMILIES,
    alpaca_rows,
    build_tiny_model,
    llama,
    build_tokenizer,
    single_torch_thread,
    train_cohort,
    tiny_config,
    write_jsonl,
)
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

from lorafleet.executor.cohort import Cohort, pack, split_passes
from lorafleet.executor.data import Example, JobData, epoch_order
from lorafleet.executor.model import load_base, packing_kwargs
from lorafleet.executor.optim import lr_factor
from lorafleet.scheduler.spec import parse_spec


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "x": write_jsonl(root / "x.jsonl", alpaca_rows(10, seed=1)),
        "y": write_jsonl(root / "y.jsonl", alpaca_rows(7, seed=2)),
        "z": write_jsonl(root / "z.jsonl", [{"text": " ".join(["the quick brown fox"] * (i + 1))} for i in range(9)]),
    }


def make_spec(model_dir, adapter=None, **hyperparameters):
    raw = {"base_model": str(model_dir), "dataset": "unused", "adapter": adapter or {}}
    raw["hyperparameters"] = {"batch_size": 2, "learning_rate": 1e-2, "lr_scheduler": "constant", **hyperparameters}
    return parse_spec(raw)


def weights(cohort: Cohort, job_id: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return cohort.jobs[job_id].adapter.lora_weights()


def assert_same_weights(got, want, rtol=1e-5):
    assert got.keys() == want.keys()
    for name in want:
        for g, w in zip(got[name], want[name]):
            err = (g - w).norm() / w.norm().clamp_min(1e-12)
            assert err <= rtol, f"{name}: relative error {err:.2e}"


def assert_same_losses(got, want, rtol=1e-5):
    assert [r.step for r in got] == [r.step for r in want]
    for g, w in zip(got, want):
        assert g.error is None and w.error is None
        assert math.isclose(g.loss, w.loss, rel_tol=rtol), (g.loss, w.loss)


X_SPEC = dict(adapter={"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}, batch_size=3, epochs=2, warmup_steps=2,
              lr_scheduler="cosine", gradient_accumulation_steps=2, weight_decay=0.01, seed=7)
# Differ from X in r, lr, batch size, sequence lengths (other data, shorter max_seq_len) and target modules.
OTHER_SPECS = {
    "y": dict(adapter={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}, batch_size=2,
              learning_rate=3e-3, max_seq_len=24, seed=3),
    "z": dict(adapter={"r": 2, "target_modules": ["down_proj", "o_proj"], "lora_dropout": 0.2}, batch_size=4,
              learning_rate=5e-2, max_steps=4, seed=5),
}


def run_x(model_dir, datasets, x_spec, with_others: bool, others=OTHER_SPECS):
    cohort = Cohort(model_dir)
    cohort.add_job("x", make_spec(model_dir, **x_spec), datasets["x"])
    if with_others:
        for job_id, spec in others.items():
            cohort.add_job(job_id, make_spec(model_dir, **spec), datasets[job_id])
    return cohort, train_cohort(cohort)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_forward_equals_each_sequence_alone(tmp_path, family):
    model_dir = build_tiny_model(tmp_path, family)
    packed_model, _ = load_base(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    sequences = [torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 11, 1, 7)]
    kwargs = packing_kwargs([len(s) for s in sequences], "cpu")
    packed = packed_model(torch.cat(sequences)[None], use_cache=False, **kwargs).logits[0]
    alone = torch.cat([reference(s[None]).logits[0] for s in sequences])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_pack_shifts_targets_within_each_sequence():
    batches = {
        "a": [Example([1, 10, 11], [-100, 10, 11]), Example([1, 12], [-100, 12])],
        "b": [Example([1, 20, 21, 22], [-100, -100, 21, 22])],
    }
    batch = pack(batches, "cpu")
    assert batch.input_ids.tolist() == [[1, 10, 11, 1, 12, 1, 20, 21, 22]]
    # the last token of a sequence never predicts the first token of the next
    assert batch.targets.tolist() == [10, 11, -100, 12, -100, -100, 21, 22, -100]
    assert batch.sequence_lengths == [3, 2, 4]
    assert batch.rows == {"a": (0, 5), "b": (5, 9)}
    assert batch.num_targets == {"a": 3, "b": 2}


def test_lora_init_is_peft_init_from_the_job_seed(llama, datasets):
    cohort = Cohort(llama)
    cohort.add_job("a", make_spec(llama, seed=11), datasets["x"])
    cohort.add_job("b", make_spec(llama, adapter={"r": 8, "target_modules": ["v_proj"]}, seed=12), datasets["y"])
    cohort.add_job("c", make_spec(llama, seed=11), datasets["y"])
    a, c = weights(cohort, "a"), weights(cohort, "c")
    assert len(a) == 2 * 7
    for name, (lora_a, lora_b) in a.items():
        bound = 1 / math.sqrt(lora_a.shape[1])  # kaiming_uniform(a=sqrt(5)) on [r, d_in]
        assert lora_a.abs().max() <= bound and lora_a.abs().max() > 0.9 * bound
        assert torch.count_nonzero(lora_b) == 0
        assert torch.equal(lora_a, c[name][0]), "same seed, same init, whoever else is in the cohort"
    first = next(iter(a.values()))[0]
    expected = torch.empty_like(first)
    torch.nn.init.kaiming_uniform_(expected, a=math.sqrt(5), generator=torch.Generator().manual_seed(11))
    assert torch.equal(first, expected)


# Bases whose projections carry other names than Llama's: y and z target theirs (x trains "all-linear").
OTHER_TARGETS = {"phi3": (["qkv_proj"], ["down_proj", "o_proj"]), "gpt2": (["c_attn"], ["c_fc", "c_proj"])}


def family_specs(family: str, x_spec: dict) -> tuple[dict, dict]:
    """X's spec and the others' for a base of `family`."""
    if family in FAMILIES:
        return x_spec, OTHER_SPECS
    x_spec = {**x_spec, "adapter": {**x_spec["adapter"], "target_modules": "all-linear"}}
    others = {job_id: {**spec, "adapter": {**spec["adapter"], "target_modules": targets}}
              for (job_id, spec), targets in zip(OTHER_SPECS.items(), OTHER_TARGETS.get(family, ()))}
    return x_spec, others or OTHER_SPECS


@pytest.mark.parametrize(
    "family, adapter_type", [("llama", "lora"), ("llama", "nola"), ("mistral", "lora"), ("qwen2", "lora"), ("gemma", "nola"),
                             ("qwen3", "lora"), ("gemma2", "lora"), ("gemma3", "nola"), ("phi3", "lora"), ("gpt2", "lora"),
                             ("gpt2", "nola"), ("qwen2_moe", "lora")]
)
def test_cohort_invariance(llama, datasets, tmp_path, family, adapter_type):
    model_dir = llama if family == "llama" else build_tiny_model(tmp_path, family)
    adapter = {**X_SPEC["adapter"], "type": adapter_type}
    if adapter_type == "nola":
        adapter["nola"] = {"num_basis": 16, "basis_seed": 3}
    x_spec, others = family_specs(family, {**X_SPEC, "adapter": adapter})
    alone, alone_history = run_x(model_dir, datasets, x_spec, with_others=False)
    together, together_history = run_x(model_dir, datasets, x_spec, with_others=True, others=others)
    assert set(together_history) == {"x", "y", "z"}
    assert len(alone_history["x"]) == 8 and alone_history["x"][-1].done  # 10 examples / 3 -> 4 a epoch, x2, /2 accum
    assert_same_losses(together_history["x"], alone_history["x"])
    assert_same_weights(weights(together, "x"), weights(alone, "x"))
    assert all(r.error is None for results in together_history.values() for r in results)


def test_split_passes_groups_whole_sequences_in_order():
    ex = lambda n: Example(list(range(1, n + 1)), [-100] + list(range(2, n + 1)))  # noqa: E731
    batches = {"a": [ex(3), ex(4)], "b": [ex(2), Example([], [])], "c": [ex(9), ex(1)]}
    lengths = lambda passes: [{j: [len(e.input_ids) for e in es] for j, es in p.items()} for p in passes]  # noqa: E731
    assert lengths(split_passes(batches, None)) == [{"a": [3, 4], "b": [2], "c": [9, 1]}]
    assert lengths(split_passes(batches, 7)) == [{"a": [3, 4]}, {"b": [2]}, {"c": [9]}, {"c": [1]}]
    assert lengths(split_passes(batches, 10)) == [{"a": [3, 4], "b": [2]}, {"c": [9, 1]}]
    # as many passes as the cap needs, evened out: 20 x 512 in passes of 8,192 is 2 x 5,120, not 8,192 + 2,048
    even = {"a": [ex(512) for _ in range(20)]}
    assert [sum(len(e.input_ids) for e in part["a"]) for part in split_passes(even, 8192)] == [5120, 5120]
    with pytest.raises(ValueError, match="max_pass_tokens 0"):
        Cohort("unused", max_pass_tokens=0)


def test_passes_give_the_one_pass_gradients(llama, datasets):
    """A step split into passes of at most 120 tokens trains every job as one pass does (no dropout: same numbers)."""
    specs = {
        "x": dict(adapter={"r": 4, "lora_alpha": 8}, batch_size=3, max_steps=3, gradient_accumulation_steps=2, seed=7),
        "y": {**OTHER_SPECS["y"], "max_seq_len": 512},
        "z": {**OTHER_SPECS["z"], "adapter": {"r": 2, "target_modules": ["down_proj", "o_proj"]}},
    }
    runs, forwards = {}, {}
    for max_pass_tokens in (None, 120):
        cohort = Cohort(llama, max_pass_tokens=max_pass_tokens)
        for job_id, spec in specs.items():
            cohort.add_job(job_id, make_spec(llama, **spec), datasets[job_id])
        forward, forwards[max_pass_tokens] = cohort._forward, []
        cohort._forward = lambda batch, forward=forward, seen=forwards[max_pass_tokens]: seen.append(
            batch.input_ids.shape[1]) or forward(batch)
        runs[max_pass_tokens] = cohort, train_cohort(cohort)
    (one, one_history), (split, split_history) = runs[None], runs[120]
    steps = len(one_history["x"])
    assert len(forwards[None]) == steps and len(forwards[120]) > 2 * steps  # really several passes a step
    assert max(forwards[120]) < max(forwards[None])
    # what an executor reports its peak against: the last step's input tokens and its largest pass
    assert one.step_tokens == one.largest_pass_tokens == forwards[None][-1]
    assert split.step_tokens == one.step_tokens and split.largest_pass_tokens < one.largest_pass_tokens
    for job_id in specs:
        assert_same_losses(split_history[job_id], one_history[job_id], rtol=1e-5)
        assert_same_weights(weights(split, job_id), weights(one, job_id), rtol=1e-5)


def test_mixed_lora_and_nola_cohort_trains_every_job(llama, datasets):
    cohort = Cohort(llama)
    # a batch is the whole dataset, so the losses of successive steps are comparable
    cohort.add_job("lora", make_spec(llama, adapter={"r": 4}, batch_size=10, max_steps=5), datasets["x"])
    nola = {"type": "nola", "r": 4, "nola": {"num_basis": 8}, "target_modules": ["q_proj", "up_proj"]}
    cohort.add_job("nola", make_spec(llama, adapter=nola, batch_size=7, max_steps=5, learning_rate=0.1), datasets["y"])
    before = {job_id: weights(cohort, job_id) for job_id in cohort.jobs}
    history = train_cohort(cohort)
    for job_id in ("lora", "nola"):
        assert [r.step for r in history[job_id]] == [1, 2, 3, 4, 5] and history[job_id][-1].done
        assert history[job_id][-1].loss < history[job_id][0].loss
        changed = [not torch.equal(b, w[1]) for (_, b), w in zip(before[job_id].values(), weights(cohort, job_id).values())]
        assert all(changed)
    nola_state = cohort.jobs["nola"].adapter.state_dict()
    assert sum(t.numel() for t in nola_state.values()) == 2 * 8 * 4  # alpha and beta: k numbers per factor per layer


def peft_reference_run(model_dir, spec, dataset, initial):
    """Train the same job with plain PEFT + torch AdamW, each sequence run on its own through HF's sdpa."""
    hp = spec.hyperparameters
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    config = LoraConfig(r=spec.adapter.r, lora_alpha=spec.adapter.lora_alpha, target_modules=list(spec.adapter.target_modules))
    model = get_peft_model(model, config)
    model.load_state_dict({f"base_model.model.{name}.lora_{f}.default.weight": t
                           for name, pair in initial.items() for f, t in zip("AB", pair)}, strict=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, betas=(hp.adam_beta1, hp.adam_beta2),
                                  eps=hp.adam_epsilon, weight_decay=hp.weight_decay)
    data = JobData(dataset, "auto", load_base(model_dir)[1], hp.max_seq_len, hp.batch_size, hp.seed)
    total_steps = math.ceil(data.steps_per_epoch * hp.epochs / hp.gradient_accumulation_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, hp.warmup_steps, total_steps)
    losses = []
    n_micro = data.steps_per_epoch * hp.epochs
    for micro in range(n_micro):
        examples, _ = data.next_batch()
        token_losses = [F.cross_entropy(model(torch.tensor([e.input_ids])).logits[0, :-1], torch.tensor(e.labels[1:]),
                                        reduction="sum") for e in examples]
        loss = sum(token_losses) / sum(sum(1 for t in e.labels[1:] if t != -100) for e in examples)
        window_start = micro - micro % hp.gradient_accumulation_steps
        (loss / min(hp.gradient_accumulation_steps, n_micro - window_start)).backward()  # the last may be shorter
        losses.append(loss.item())
        if (micro + 1) % hp.gradient_accumulation_steps == 0 or micro + 1 == n_micro:
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    state = model.state_dict()
    final = {name: tuple(state[f"base_model.model.{name}.lora_{f}.default.weight"] for f in "AB") for name in initial}
    return losses, final


def test_matches_plain_peft_training(llama, datasets):
    spec = make_spec(llama, adapter={"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]},
                     batch_size=3, epochs=2, gradient_accumulation_steps=2, warmup_steps=1, lr_scheduler="linear",
                     weight_decay=0.05, max_grad_norm=0.5, seed=2)
    cohort = Cohort(llama)
    cohort.add_job("x", spec, datasets["x"])
    cohort.add_job("other", make_spec(llama, adapter={"r": 2}, batch_size=4, seed=9), datasets["z"])
    initial = weights(cohort, "x")
    history = train_cohort(cohort)
    want_losses, want = peft_reference_run(llama, spec, datasets["x"], initial)
    assert [r.loss for r in history["x"]] == pytest.approx(want_losses, rel=1e-5)
    # Measured: 2.4e-6 on an AVX-512 host, 1.3e-5 on an AVX2 one (AMD EPYC): the cohort's packed row and PEFT's padded
    # batch are GEMMs of other row counts, which the CPU's BLAS blocks (and rounds) differently; AdamW's normalised
    # update carries that into the weights. A wrong term is O(1e-2) (the partial window's divisor: 4e-2).
    assert_same_weights(weights(cohort, "x"), want, rtol=5e-5)


def test_a_last_partial_accumulation_window_is_the_mean_of_its_micro_batches(llama, datasets):
    """10 examples in batches of 2 are 5 micro-batches: a window of 3, then one of 2, stepped with its own mean (dividing
    it by 3 gave a 4e-2 relative error in the weights here). No clipping: it would rescale both to the same norm."""
    spec = make_spec(llama, adapter={"r": 4, "lora_alpha": 16}, batch_size=2, epochs=1, gradient_accumulation_steps=3,
                     lr_scheduler="linear", max_grad_norm=1e6, seed=4)
    cohort = Cohort(llama)
    cohort.add_job("x", spec, datasets["x"])
    initial = weights(cohort, "x")
    history = train_cohort(cohort)["x"]
    assert [r.step for r in history] == [0, 0, 1, 1, 2] and history[-1].done
    want_losses, want = peft_reference_run(llama, spec, datasets["x"], initial)
    assert [r.loss for r in history] == pytest.approx(want_losses, rel=1e-5)
    assert_same_weights(weights(cohort, "x"), want)


def test_a_window_without_targets_leaves_the_weights_alone_after_real_steps(llama, tmp_path):
    """AdamW would still move the weights by its momentum and weight decay; a window with nothing to learn must not."""
    long_prompt = " ".join(["describe the quick brown fox and the lazy dog"] * 20)
    rows = [{"instruction": "say", "input": "", "output": "yes it is"} if i % 2 else
            {"instruction": f"{i} {long_prompt}", "input": "", "output": "no"} for i in range(8)]
    spec = make_spec(llama, adapter={"r": 4}, batch_size=1, max_seq_len=96, max_steps=8, weight_decay=0.1, seed=1)
    cohort = Cohort(llama)
    cohort.add_job("j", spec, write_jsonl(tmp_path / "d.jsonl", rows))
    learned, skipped = 0, 0
    for _ in range(8):
        before = weights(cohort, "j")
        (result,) = cohort.step().values()
        if result.tokens:
            learned += 1
            assert result.loss is not None
        elif learned:  # a window with no targets after the optimizer has momentum
            skipped += 1
            assert_same_weights(weights(cohort, "j"), before, rtol=0)
            assert result.loss is None and result.grad_norm is None
    assert learned and skipped, (learned, skipped)
    assert cohort.jobs["j"].step == 8 and cohort.jobs["j"].done


def test_nan_loss_fails_that_job_alone(llama, datasets):
    reference = Cohort(llama)
    for job_id in ("y", "z"):
        reference.add_job(job_id, make_spec(llama, **OTHER_SPECS[job_id]), datasets[job_id])
    reference_history = train_cohort(reference)

    cohort = Cohort(llama)
    cohort.add_job("bad", make_spec(llama, adapter={"r": 4}, max_steps=6), datasets["x"])
    for job_id in ("y", "z"):
        cohort.add_job(job_id, make_spec(llama, **OTHER_SPECS[job_id]), datasets[job_id])
    train_cohort(cohort, steps=2)
    with torch.no_grad():
        cohort.jobs["bad"].adapter.lora_A[3][0, 0] = float("nan")  # e.g. a corrupted weight
    results = cohort.step()
    assert "bad" in results and "loss is nan at step 3" in results["bad"].error
    assert cohort.active_jobs() == ["y", "z"]
    history = train_cohort(cohort)
    assert "bad" not in history
    for job_id in ("y", "z"):
        assert_same_weights(weights(cohort, job_id), weights(reference, job_id))
        assert history[job_id][-1].step == reference_history[job_id][-1].step


def test_non_finite_gradients_fail_that_job_before_its_weights_change(llama, datasets):
    cohort = Cohort(llama)
    cohort.add_job("bad", make_spec(llama, adapter={"r": 4}), datasets["x"])
    cohort.add_job("good", make_spec(llama, adapter={"r": 4}, seed=1), datasets["y"])
    train_cohort(cohort, steps=1)
    before = weights(cohort, "bad")
    cohort.jobs["bad"].adapter.lora_B[0].register_hook(lambda grad: grad * float("inf"))
    results = cohort.step()
    assert results["bad"].error and "gradient norm is" in results["bad"].error and "at step 2" in results["bad"].error
    assert results["good"].error is None and results["good"].step == 2
    assert_same_weights(weights(cohort, "bad"), before, rtol=0)


def test_bad_data_line_mid_run_fails_that_job_with_the_line_number(llama, datasets, tmp_path):
    rows = alpaca_rows(8)
    lines = [json.dumps(row) for row in rows]
    lines[5] = '{"instruction": "broken'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    cohort = Cohort(llama)
    cohort.add_job("bad", make_spec(llama, batch_size=1, epochs=1), bad)
    cohort.add_job("good", make_spec(llama, max_steps=10), datasets["x"])
    history = train_cohort(cohort)
    errors = [r.error for r in history["bad"] if r.error]
    assert len(errors) == 1 and "bad.jsonl line 6" in errors[0] and "data error" in errors[0]
    # each step reads the next micro-batch ahead (the bad line included): the error still comes at the step that
    # would have drawn it, after every batch before it has trained
    reaching_step = epoch_order(8, cohort.jobs["bad"].data.seed, 0).index(5) + 1
    assert f"data error at step {reaching_step}:" in errors[0] and len(history["bad"]) == reaching_step
    assert history["good"][-1].step == 10 and history["good"][-1].done


def test_jobs_join_and_leave_between_steps_without_rebuilding(llama, datasets):
    solo = Cohort(llama)
    solo.add_job("late", make_spec(llama, **OTHER_SPECS["y"]), datasets["y"])
    solo_history = train_cohort(solo)

    cohort = Cohort(llama)
    model, base_weights = cohort.model, [p.clone() for p in cohort.model.parameters()]
    cohort.add_job("early", make_spec(llama, adapter={"r": 4}, max_steps=20), datasets["x"])
    train_cohort(cohort, steps=3)
    cohort.add_job("late", make_spec(llama, **OTHER_SPECS["y"]), datasets["y"])
    train_cohort(cohort, steps=2)
    cohort.remove_job("early")
    layer = cohort.model.model.layers[0].self_attn.q_proj
    assert list(layer.adapters) == ["late"]
    history = train_cohort(cohort)
    assert cohort.model is model
    assert all(torch.equal(p, before) for p, before in zip(cohort.model.parameters(), base_weights, strict=True))
    assert len(history["late"]) + 2 == len(solo_history["late"])
    assert_same_weights(weights(cohort, "late"), weights(solo, "late"))


def test_step_results_report_lr_schedule_tokens_and_done(llama, datasets):
    cohort = Cohort(llama)
    cohort.add_job("x", make_spec(llama, max_steps=4, warmup_steps=2, lr_scheduler="linear", learning_rate=0.1), datasets["x"])
    history = train_cohort(cohort)["x"]
    assert [r.lr for r in history] == pytest.approx([0.0, 0.05, 0.1, 0.05])
    assert [r.done for r in history] == [False, False, False, True]
    assert all(r.tokens > 0 and r.grad_norm > 0 for r in history)
    assert cohort.step() == {}


def test_lr_factor_schedules():
    assert lr_factor(0, 2, 10, "constant") == 0 and lr_factor(1, 2, 10, "constant") == 0.5
    assert lr_factor(6, 2, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(6, 2, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 2, 10, "cosine") == pytest.approx(0.0)


def test_add_job_refuses_what_it_cannot_train(llama, datasets):
    cohort = Cohort(llama)
    with pytest.raises(ValueError, match=r"\['qkv'\] match no module"):
        cohort.add_job("a", make_spec(llama, adapter={"target_modules": ["q_proj", "qkv"]}), datasets["x"])
    with pytest.raises(ValueError, match="embed_tokens is a Embedding, not a linear layer"):
        cohort.add_job("a", make_spec(llama, adapter={"target_modules": ["embed_tokens"]}), datasets["x"])
    spec = parse_spec({"base_model": str(llama), "dataset": "d", "quantization": "nf4"})
    with pytest.raises(ValueError, match="quantization=nf4"):
        cohort.add_job("a", spec, datasets["x"])
    cohort.add_job("a", make_spec(llama), datasets["x"])
    with pytest.raises(ValueError, match="already in this cohort"):
        cohort.add_job("a", make_spec(llama), datasets["x"])


def test_a_micro_batch_without_targets_reports_no_loss_and_changes_nothing(llama, datasets):
    cohort = Cohort(llama)
    # alpaca prompts are longer than 8 tokens, so truncation leaves no response token to learn from
    cohort.add_job("cut", make_spec(llama, max_seq_len=8, max_steps=2), datasets["x"])
    before = weights(cohort, "cut")
    history = train_cohort(cohort)["cut"]
    assert [(r.loss, r.tokens, r.step) for r in history] == [(None, 0, 1), (None, 0, 2)] and history[-1].done
    assert_same_weights(weights(cohort, "cut"), before, rtol=0)


def test_packed_attention_keeps_mistral_sliding_window(tmp_path):
    config = tiny_config("mistral", len(build_tokenizer()))
    config.sliding_window = 4
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    packed_model, _ = load_base(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    sequences = [torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 3, 12)]
    kwargs = packing_kwargs([len(s) for s in sequences], "cpu")
    packed = packed_model(torch.cat(sequences)[None], use_cache=False, **kwargs).logits[0]
    alone = torch.cat([reference(s[None]).logits[0] for s in sequences])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    full_attention = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa", sliding_window=None)
    assert not torch.allclose(full_attention(sequences[2][None]).logits[0], alone[12:], atol=1e-4), "window must matter"


def test_nola_jobs_with_the_same_bases_share_one_copy():
    import gc

    from lorafleet.executor.adapters import _SHARED_BASES, build_adapter
    from lorafleet.scheduler.spec import AdapterSpec

    shapes = {"layers.0.q_proj": (64, 64), "layers.0.v_proj": (64, 32)}
    spec = AdapterSpec(type="nola", r=4, nola={"num_basis": 8, "basis_seed": 11})
    first, second = build_adapter(spec, shapes, seed=1), build_adapter(spec, shapes, seed=2)
    other = build_adapter(AdapterSpec(type="nola", r=4, nola={"num_basis": 8, "basis_seed": 12}), shapes, seed=1)
    assert first.bases is second.bases and first.bases[0][0] is second.bases[0][0]
    assert other.bases is not first.bases and not torch.equal(other.bases[0][0], first.bases[0][0])
    assert not torch.equal(first.factors("layers.0.q_proj")[0], second.factors("layers.0.q_proj")[0])
    gc.collect()  # cohorts of earlier tests (reference cycles) must not go away inside the count below
    cached = len(_SHARED_BASES)
    del first, second
    gc.collect()
    assert len(_SHARED_BASES) == cached - 1, "the bases go away with the last job that used them"


def test_evaluate_is_the_mean_target_loss_over_the_validation_set(llama, datasets):
    import torch.nn.functional as F

    cohort = Cohort(llama)
    spec = make_spec(llama, {"r": 4, "lora_dropout": 0.5}, max_steps=3)
    cohort.add_job("x", spec, datasets["x"])
    cohort.add_job("y", make_spec(llama, {"r": 8}, max_steps=3), datasets["y"])
    train_cohort(cohort)
    validation = JobData(datasets["y"], "auto", cohort.tokenizer, 512, 3, seed=0)
    examples = [validation.next_batch()[0] for _ in range(validation.steps_per_epoch)]
    total, count = 0.0, 0
    for example in (e for batch in examples for e in batch):
        logits = cohort.logits("x", example.input_ids)
        labels = torch.tensor(example.labels[1:] + [-100])
        total += F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())

    got = cohort.evaluate("x", JobData(datasets["y"], "auto", cohort.tokenizer, 512, 3, seed=0))
    assert got == pytest.approx(total / count, rel=1e-5)
    assert cohort.jobs["x"].adapter.training, "evaluation leaves the adapter in training mode"


def test_dropout_state_from_another_kind_of_device_continues_deterministically():
    from lorafleet.executor.adapters import build_adapter
    from lorafleet.scheduler.spec import AdapterSpec

    spec = AdapterSpec(r=4, lora_dropout=0.5)
    saved = {"dropout_rng": torch.arange(16, dtype=torch.uint8), "dropout_rng_device": "cuda"}  # a Philox-sized state
    seeds = []
    for _ in range(2):
        adapter = build_adapter(spec, {"proj": (8, 8)}, seed=3)
        adapter.load_rng_state(saved)
        seeds.append(adapter.draw_dropout_seed())
    fresh = build_adapter(spec, {"proj": (8, 8)}, seed=3).draw_dropout_seed()
    assert torch.equal(seeds[0], seeds[1]), "the same saved state gives the same continuation"
    assert not torch.equal(seeds[0], fresh), "it continues from the saved state, not from the seed"


def test_a_validation_pass_joins_micro_batches_up_to_the_largest_training_pass(llama, datasets):
    cohort = Cohort(llama)
    cohort.add_job("x", make_spec(llama, {"r": 4}, max_steps=3, batch_size=4), datasets["x"])
    train_cohort(cohort, steps=1)
    forwards = []
    forward = cohort._forward
    cohort._forward = lambda batch: forwards.append(batch.input_ids.numel()) or forward(batch)

    def validation():  # 7 micro-batches of one example each
        return JobData(datasets["y"], "auto", cohort.tokenizer, 512, 1, seed=0)

    joined = cohort.evaluate("x", validation())
    assert 1 < len(forwards) < 7 and max(forwards) <= cohort.largest_pass_tokens
    forwards.clear()
    cohort.largest_pass_tokens = 0  # nothing to join up to: one forward per micro-batch
    apart = cohort.evaluate("x", validation())
    assert len(forwards) == 7
    assert joined == pytest.approx(apart, rel=1e-6), "the same mean loss however the micro-batches are grouped"
