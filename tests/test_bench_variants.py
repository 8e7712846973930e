"""bench/bench_variants.py compares like with like: a preference job's micro-batch holds the tokens of an SFT one."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_e2e import SHAPES, save_tokenizer, write_job_data  # noqa: E402
from bench_variants import BATCH, variant_spec, write_pair_data  # noqa: E402

from lorafleet.executor.data import JobData


def micro_batch_lengths(tmp_path, variant, data_path):
    from transformers import AutoTokenizer

    spec = variant_spec(tmp_path, variant, 0)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    hp = spec.hyperparameters
    data = JobData(data_path, "auto", tokenizer, hp.max_seq_len, hp.batch_size, hp.seed)
    examples, _epoch = data.next_batch()
    return [end - begin for example in examples for begin, end in example.sequences()]


def test_a_dpo_job_of_the_bench_packs_as_many_tokens_as_an_sft_job(tmp_path):
    vocab = SHAPES["tiny"]["vocab_size"]
    save_tokenizer(tmp_path, vocab)
    sft = micro_batch_lengths(tmp_path, "lora", write_job_data(tmp_path, BATCH, 0, vocab))
    pairs = micro_batch_lengths(tmp_path, "dpo", write_pair_data(tmp_path, 0, vocab))
    assert sft == [512] * 4
    assert pairs == sft
