"""Training data: formats, label masks, truncation, shuffling, exact resume and line-numbered errors."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from importlib import resources

import pytest
import torch
from helpers_models import alpaca_rows, build_tokenizer, write_jsonl

from lorafleet.executor.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    DataError,
    JobData,
    detect_format,
    epoch_order,
)


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def plain_tokenizer():
    """The same vocabulary without a chat template and without an automatic BOS."""
    tok = build_tokenizer(bos=False)
    tok.chat_template = None
    return tok


def target_spans(tokenizer, example) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        spans.append(current)
    return [tokenizer.decode(span) for span in spans]


def only_example(path, tokenizer, fmt="auto", max_seq_len=512):
    data = JobData(path, fmt, tokenizer, max_seq_len=max_seq_len, batch_size=1, seed=0)
    assert data.num_examples == 1
    (example,), _ = data.next_batch()
    assert len(example.input_ids) == len(example.labels)
    assert example.labels[0] == IGNORE_INDEX
    return data, example


CHAT = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is two plus two?"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "and the sea?"},
        {"role": "assistant", "content": "blue sky"},
    ]
}


def test_detect_format():
    assert detect_format({"instruction": "a", "output": "b"}) == "alpaca"
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"text": "x", "id": 3}) == "text"
    with pytest.raises(DataError, match="unknown format"):
        detect_format({"prompt": "a"})
    with pytest.raises(DataError, match="ambiguous"):
        detect_format({"text": "a", "instruction": "b"})
    with pytest.raises(DataError, match="JSON object"):
        detect_format(["text"])


@pytest.mark.parametrize("context", ["the sea", "", None])
def test_alpaca_loss_is_exactly_the_output_and_eos(tmp_path, tokenizer, context):
    row = {"instruction": "write a poem", "output": "the sky is blue"}
    if context is not None:
        row["input"] = context
    data, example = only_example(write_jsonl(tmp_path / "a.jsonl", [row]), tokenizer)
    assert data.fmt == "alpaca"
    assert target_spans(tokenizer, example) == ["the sky is blue</s>"]
    prompt = ALPACA_PROMPT.format(instruction="write a poem", input=context) if context else (
        ALPACA_PROMPT_NO_INPUT.format(instruction="write a poem")
    )
    assert tokenizer.decode(example.input_ids) == "<s>" + prompt + "the sky is blue</s>"
    assert example.num_targets == len(tokenizer.encode("the sky is blue", add_special_tokens=False)) + 1


def sentencepiece_style_tokenizer():
    """Metaspace pre-tokenisation like Llama 2 / Mistral / Gemma: a word after a space gets a '▁' marker."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    metaspace = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), metaspace])
    byte_tokens = [f"<0x{byte:02X}>" for byte in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens)
    tok.train_from_iterator([ALPACA_PROMPT, "write a poem about the sky", "the sky is blue"] * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_the_whole_text_is_tokenised_at_once_as_inference_would(tmp_path):
    tok = sentencepiece_style_tokenizer()
    row = {"instruction": "write a poem", "output": "the sky is blue"}
    _, example = only_example(write_jsonl(tmp_path / "a.jsonl", [row]), tok)
    prompt = ALPACA_PROMPT_NO_INPUT.format(instruction="write a poem")
    assert example.input_ids == tok(prompt + "the sky is blue</s>")["input_ids"]
    first_target = next(label for label in example.labels if label != IGNORE_INDEX)
    alone = tok.encode("the sky is blue", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(alone)[0].startswith("▁")  # tokenised apart, the reply would gain a marker
    assert not tok.convert_ids_to_tokens(first_target).startswith("▁")
    assert target_spans(tok, example) == ["the sky is blue</s>"]


def test_text_loss_covers_every_predicted_token(tmp_path, tokenizer, plain_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "the quick brown fox"}])
    _, example = only_example(path, tokenizer)
    assert tokenizer.decode(example.input_ids) == "<s>the quick brown fox</s>"
    assert example.labels[1:] == example.input_ids[1:]
    # Without an automatic BOS the first text token is the one nothing predicts.
    _, example = only_example(path, plain_tokenizer)
    assert plain_tokenizer.decode(example.input_ids) == "the quick brown fox</s>"
    assert example.labels[1:] == example.input_ids[1:]


def test_chat_uses_the_template_and_learns_every_assistant_turn(tmp_path, tokenizer):
    data, example = only_example(write_jsonl(tmp_path / "c.jsonl", [CHAT]), tokenizer)
    assert data.fmt == "chat"
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert target_spans(tokenizer, example) == ["four</s>", "blue sky</s>"]


def test_chat_fallback_format_without_a_template(tmp_path, plain_tokenizer):
    _, example = only_example(write_jsonl(tmp_path / "c.jsonl", [CHAT]), plain_tokenizer)
    assert plain_tokenizer.decode(example.input_ids) == (
        "System:\nbe brief\n\nUser:\nwhat is two plus two?\n\nAssistant:\nfour</s>"
        "User:\nand the sea?\n\nAssistant:\nblue sky</s>"
    )
    assert target_spans(plain_tokenizer, example) == ["four</s>", "blue sky</s>"]


MISTRAL_LIKE_TEMPLATE = (
    "{% set ns = namespace(last_user=-1, system='') %}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\\n\\n' %}{% endif %}{% endfor %}"
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
    "{% if loop.index0 == ns.last_user %}{{ ns.system }}{% endif %}{{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(
    "template, targets",
    [
        (MISTRAL_LIKE_TEMPLATE, [" four</s>", " blue sky</s>"]),  # the space before a reply joins its first word
        ("{% for m in messages %}{{ m['content'] }}|{% endfor %}{{ messages | length }}", ["four", "blue sky"]),
    ],
    ids=["system-prompt-moves-to-last-user-turn", "suffix-changes"],
)
def test_chat_template_that_rerenders_earlier_turns(tmp_path, template, targets):
    """Templates whose rendering of a conversation prefix is not a prefix of the whole still get exact targets."""
    tok = build_tokenizer()
    tok.chat_template = template
    _, example = only_example(write_jsonl(tmp_path / "c.jsonl", [CHAT]), tok)
    assert tok.decode(example.input_ids) == tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert target_spans(tok, example) == targets


def test_truncation_keeps_the_start_and_targetless_examples_still_count(tmp_path, tokenizer):
    rows = [{"text": "the quick brown fox jumps over the lazy dog"}]
    _, full = only_example(write_jsonl(tmp_path / "t.jsonl", rows), tokenizer)
    _, cut = only_example(tmp_path / "t.jsonl", tokenizer, max_seq_len=5)
    assert cut.input_ids == full.input_ids[:5] and cut.labels == full.labels[:5]

    short = {"instruction": "a", "output": "b"}
    _, short_example = only_example(write_jsonl(tmp_path / "s.jsonl", [short]), tokenizer)
    fits = len(short_example.input_ids)
    long_prompt = {"instruction": "write a short poem about the sea and the sky " * 4, "output": "four"}
    path = write_jsonl(tmp_path / "a.jsonl", [long_prompt, short])
    data = JobData(path, "alpaca", tokenizer, max_seq_len=fits, batch_size=2, seed=0)
    batch, epoch = data.next_batch()
    assert epoch == 0 and len(batch) == 2
    assert all(len(example.input_ids) == fits for example in batch)
    assert sorted(example.num_targets for example in batch) == [0, 2]  # "b" + EOS survives; "four" is cut off


def drain(data: JobData, steps: int) -> list[tuple[int, tuple[tuple[int, ...], ...]]]:
    """`steps` batches as (epoch, input ids of each example), comparable with ==."""
    out = []
    for _ in range(steps):
        batch, epoch = data.next_batch()
        out.append((epoch, tuple(tuple(example.input_ids) for example in batch)))
    return out


def ids_of(data: JobData) -> list[tuple[int, ...]]:
    probe = JobData(data.path, data.fmt, build_tokenizer(), data.max_seq_len, batch_size=data.num_examples, seed=0)
    return sorted(tuple(example.input_ids) for example in probe.next_batch()[0])


def test_shuffle_is_deterministic_per_seed_and_epoch_and_visits_each_example_once(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))
    make = lambda seed: JobData(path, "auto", tokenizer, max_seq_len=512, batch_size=4, seed=seed)
    data = make(7)
    assert (data.num_examples, data.steps_per_epoch) == (10, 3)
    run = drain(data, 9)
    assert run == drain(make(7), 9)
    assert run != drain(make(8), 9)

    assert [epoch for epoch, _ in run] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [len(batch) for _, batch in run] == [4, 4, 2] * 3
    epochs = [[ids for _, batch in run[3 * e : 3 * e + 3] for ids in batch] for e in range(3)]
    everything = ids_of(data)
    assert all(sorted(order) == everything for order in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_epoch_order_is_the_same_in_a_fresh_process():
    script = "from lorafleet.executor.data import epoch_order; print(epoch_order(50, 11, 3))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-P", "-c", script], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == epoch_order(50, 11, 3)
    assert sorted(epoch_order(50, 11, 3)) == list(range(50)) and epoch_order(50, 11, 3) != epoch_order(50, 11, 4)


def test_shuffle_leaves_the_global_rngs_alone(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(6))
    random.seed(1)
    torch.manual_seed(1)
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    drain(JobData(path, "auto", tokenizer, max_seq_len=512, batch_size=4, seed=0), 5)
    assert random.getstate() == python_state
    assert torch.equal(torch.get_rng_state(), torch_state)


@pytest.mark.parametrize("stop_after", [0, 2, 3, 5])
def test_resume_from_state_dict_draws_the_identical_remaining_sequence(tmp_path, tokenizer, stop_after):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))
    make = lambda: JobData(path, "alpaca", tokenizer, max_seq_len=512, batch_size=3, seed=3)
    uninterrupted = drain(make(), 12)

    first = make()
    before = drain(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    resumed = make()
    resumed.load_state_dict(state)
    assert before + drain(resumed, 12 - stop_after) == uninterrupted


def drain_reading_ahead(data, n, resume_at=None, state=None) -> list:
    """`drain`, with the next batch read ahead after each one, as the cohort does while the GPU runs its step; at
    batch `resume_at` the cursor is moved back by `state` after the read-ahead."""
    drawn = []
    for i in range(n):
        data.read_ahead()
        if i == resume_at:
            data.load_state_dict(state)
        batch, epoch = data.next_batch()
        drawn.append((epoch, tuple(tuple(example.input_ids) for example in batch)))
        data.read_ahead()
    return drawn


@pytest.mark.parametrize("stop_after", [0, 2, 3, 5])
def test_reading_ahead_changes_neither_the_batches_nor_the_saved_cursor(tmp_path, tokenizer, stop_after):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))
    make = lambda: JobData(path, "alpaca", tokenizer, max_seq_len=512, batch_size=3, seed=3)
    uninterrupted = drain(make(), 12)
    assert drain_reading_ahead(make(), 12) == uninterrupted

    first, plain = make(), make()
    drain_reading_ahead(first, stop_after)
    drain(plain, stop_after)
    assert first.state_dict() == plain.state_dict()  # the batch read ahead is not counted as drawn
    resumed = make()
    drain_reading_ahead(resumed, 7)  # read ahead of another cursor, then moved back to `first`'s
    assert drain_reading_ahead(resumed, 12 - stop_after, resume_at=0, state=first.state_dict()) == \
        uninterrupted[stop_after:]


def test_resume_refuses_a_different_dataset_or_batch_size(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))
    data = JobData(path, "alpaca", tokenizer, max_seq_len=512, batch_size=3, seed=3)
    drain(data, 2)
    state = data.state_dict()
    with pytest.raises(DataError, match="batch_size was 3"):
        JobData(path, "alpaca", tokenizer, max_seq_len=512, batch_size=4, seed=3).load_state_dict(state)
    shorter = write_jsonl(tmp_path / "b.jsonl", alpaca_rows(9))
    with pytest.raises(DataError, match="num_examples was 10"):
        JobData(shorter, "alpaca", tokenizer, max_seq_len=512, batch_size=3, seed=3).load_state_dict(state)
    with pytest.raises(DataError, match="batch_in_epoch"):
        data.load_state_dict({**state, "batch_in_epoch": 4})


GOOD = json.dumps({"instruction": "say hi", "output": "hi"}).encode()
GOOD_CHAT = json.dumps(CHAT).encode()

BAD_LINES = {
    "not utf-8": (GOOD, b'{"instruction": "caf\xe9", "output": "x"}', "not valid UTF-8"),
    "invalid json": (GOOD, b'{"instruction": "a", "output": ', "invalid JSON"),
    "not an object": (GOOD, b'["instruction", "output"]', "expected a JSON object, got array"),
    "missing output": (GOOD, b'{"instruction": "a"}', "missing 'output'"),
    "output not a string": (GOOD, b'{"instruction": "a", "output": 4}', "'output' must be a string, got number"),
    "input not a string": (GOOD, b'{"instruction": "a", "input": [], "output": "b"}', "'input' must be a string"),
    "other format": (GOOD, b'{"text": "a"}', "record is in text format, but the dataset is alpaca"),
    "unknown keys": (GOOD, b'{"prompt": "a"}', "missing 'instruction'"),
    "unknown role": (
        GOOD_CHAT,
        b'{"messages": [{"role": "tool", "content": "a"}, {"role": "assistant", "content": "b"}]}',
        "message 1: unknown role 'tool'",
    ),
    "message without a role": (GOOD_CHAT, b'{"messages": [{"content": "a"}]}', "message 1: missing 'role'"),
    "messages not a list": (GOOD_CHAT, b'{"messages": "hi"}', "'messages' must be an array, got string"),
    "content not a string": (
        GOOD_CHAT,
        b'{"messages": [{"role": "user", "content": null}]}',
        "message 1: 'content' must be a string, got null",
    ),
    "no assistant turn": (GOOD_CHAT, b'{"messages": [{"role": "user", "content": "a"}]}', "no assistant message"),
    "lone surrogate": (GOOD, b'{"instruction": "a\\ud800", "output": "b"}', "unpaired surrogate"),
    "huge integer": (GOOD, b'{"instruction": "a", "output": "b", "id": ' + b"9" * 5000 + b"}", "invalid JSON"),
    "deep nesting": (GOOD, b'{"instruction": "a", "output": "b", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                     "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_bad_line_fails_the_step_that_reaches_it_with_its_line_number(tmp_path, tokenizer, case):
    good, bad, problem = BAD_LINES[case]
    # Line 1 good, line 2 blank, line 3 bad, lines 4.. good: numbering counts the blank line.
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join([good, b"", bad] + [good] * 6) + b"\n")
    data = JobData(path, "auto", tokenizer, max_seq_len=128, batch_size=1, seed=5)
    assert data.num_examples == 8
    served = 0
    with pytest.raises(DataError) as error:
        while served < data.steps_per_epoch:
            data.next_batch()
            served += 1
    assert str(error.value).startswith("train.jsonl line 3: ")
    assert problem in str(error.value)
    assert served < data.steps_per_epoch
    with pytest.raises(DataError, match="line 3"):  # the failing step did not advance past the bad line
        data.next_batch()


def test_construction_fails_clearly_for_unusable_files(tmp_path, tokenizer):
    def build(name, fmt="auto"):
        return JobData(tmp_path / name, fmt, tokenizer, max_seq_len=512, batch_size=2, seed=0)

    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        build("missing.jsonl")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match="empty.jsonl: the file is empty"):
        build("empty.jsonl")
    (tmp_path / "blank.jsonl").write_bytes(b"\n  \n\r\n")
    with pytest.raises(DataError, match="blank.jsonl: no examples"):
        build("blank.jsonl")
    (tmp_path / "first.jsonl").write_bytes(b"\n" + b'{"question": "a"}\n' + GOOD + b"\n")
    with pytest.raises(DataError, match="first.jsonl line 2: unknown format"):
        build("first.jsonl")
    write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match="alpaca.jsonl line 1: record is in alpaca format, but the dataset is chat"):
        build("alpaca.jsonl", fmt="chat")
    with pytest.raises(ValueError, match="unknown dataset format"):
        build("alpaca.jsonl", fmt="sharegpt")


def test_windows_line_endings_and_a_byte_order_mark_are_fine(tmp_path, tokenizer):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD + b"\r\n" + GOOD + b"\r\n")
    data = JobData(path, "auto", tokenizer, max_seq_len=512, batch_size=2, seed=0)
    batch, _ = data.next_batch()
    assert [target_spans(tokenizer, example) for example in batch] == [["hi</s>"], ["hi</s>"]]


def test_examples_are_cached_after_first_use(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(5))
    data = JobData(path, "alpaca", tokenizer, max_seq_len=512, batch_size=2, seed=0)
    first_epoch = drain(data, 3)
    path.unlink()
    second_epoch = drain(data, 3)
    assert sorted(ids for _, batch in first_epoch for ids in batch) == sorted(
        ids for _, batch in second_epoch for ids in batch
    )
    batch, _ = data.next_batch()
    batch[0].input_ids.append(999)  # callers get copies, not the cache
    assert 999 not in [ids[-1] for _, b in drain(data, 3) for ids in b]


@pytest.mark.parametrize("with_template", [True, False])
@pytest.mark.parametrize("name, fmt", [("alpaca_demo.jsonl", "alpaca"), ("chat_demo.jsonl", "chat")])
def test_sample_datasets_load_completely(tokenizer, plain_tokenizer, name, fmt, with_template):
    sample = resources.files("lorafleet.scheduler") / "samples" / name
    with resources.as_file(sample) as path:
        data = JobData(path, "auto", tokenizer if with_template else plain_tokenizer, 512, batch_size=8, seed=0)
        assert data.fmt == fmt and data.num_examples >= 60
        examples = [example for _ in range(data.steps_per_epoch) for example in data.next_batch()[0]]
    assert len(examples) == data.num_examples
    assert all(example.num_targets > 0 for example in examples)


def test_chat_template_errors_and_end_of_turn_markers(tmp_path):
    """A template's own end-of-turn text is the target's end; a template that refuses a role fails that line."""
    tok = build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    conversation = {"messages": CHAT["messages"][1:]}
    data, example = only_example(write_jsonl(tmp_path / "c.jsonl", [conversation]), tok)
    assert target_spans(tok, example) == ["four</s>\n", "blue sky</s>\n"]

    write_jsonl(tmp_path / "s.jsonl", [conversation, CHAT])
    data = JobData(tmp_path / "s.jsonl", "chat", tok, max_seq_len=512, batch_size=2, seed=0)
    with pytest.raises(DataError, match="s.jsonl line 2: the chat template rejects this conversation: no system role"):
        data.next_batch()


def test_a_bad_line_read_ahead_fails_only_the_step_that_reaches_it(tmp_path, tokenizer):
    good, bad, _ = BAD_LINES["invalid json"]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join([good, bad, good, good]) + b"\n")
    data = JobData(path, "alpaca", tokenizer, max_seq_len=128, batch_size=1, seed=0)
    order = epoch_order(4, 0, 0)
    for _ in range(order.index(1)):  # every batch before the bad line's is served, each read ahead first
        data.read_ahead()
        data.next_batch()
    data.read_ahead()  # reads the bad line: nothing raised yet
    with pytest.raises(DataError, match="train.jsonl line 2: invalid JSON"):
        data.next_batch()
    assert data.state_dict()["batch_in_epoch"] == order.index(1)  # and the cursor stays on it


def test_peek_shows_the_micro_batch_read_ahead_that_next_batch_hands_out(tmp_path, tokenizer):
    good, bad, _ = BAD_LINES["invalid json"]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join([good, bad, good]) + b"\n")
    data = JobData(path, "alpaca", tokenizer, max_seq_len=128, batch_size=1, seed=0)
    assert epoch_order(3, 0, 0)[:2] == [2, 1]  # a good line first, then the bad one
    assert data.peek() is None  # nothing read ahead yet
    data.read_ahead()
    peeked = data.peek()
    assert peeked is data.next_batch()[0]  # the very list the step draws
    assert data.peek() is None  # the cursor moved past what was read
    data.read_ahead()
    assert data.peek() is None  # the bad line's read failed: nothing to show; the step that draws it fails
    with pytest.raises(DataError, match="line 2"):
        data.next_batch()


def test_anything_else_reading_ahead_raises_is_raised_where_the_step_draws_the_batch(tmp_path, tokenizer,
                                                                                   monkeypatch):
    """The cohort reads ahead after launching a step's update: nothing may raise there, mid-step."""
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4))
    data = JobData(path, "alpaca", tokenizer, max_seq_len=512, batch_size=4, seed=0)

    def broken(*args):
        raise RuntimeError("tokenizer broke")

    monkeypatch.setattr("lorafleet.executor.data.tokenise_example", broken)
    data.read_ahead()
    with pytest.raises(RuntimeError, match="tokenizer broke"):
        data.next_batch()
    assert data.state_dict()["batch_in_epoch"] == 0


def test_a_file_changed_under_a_running_job_is_reported(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4))
    data = JobData(path, "alpaca", tokenizer, max_seq_len=512, batch_size=2, seed=0)
    write_jsonl(path, alpaca_rows(5))
    with pytest.raises(DataError, match="a.jsonl: the file changed size"):
        data.next_batch()
