"""Tiny random decoder models with a local tokenizer, saved to disk so tests load them like a real base.

No hub access: the tokenizer is a byte-level BPE trained on a few sentences (so any text tokenizes), wrapped in
`PreTrainedTokenizerFast` with a small chat template. Weights are random but deterministic (seeded).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
)

FAMILIES = ("llama", "mistral", "qwen2", "gemma")
# Families whose projections carry other names or layouts than Llama's (fused qkv_proj, GPT-2's Conv1D, MoE experts).
MORE_FAMILIES = ("qwen3", "gemma2", "gemma3", "phi3", "gpt2", "qwen2_moe")

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "write a short poem about the sea and the sky",
    "question: what is two plus two? answer: four",
    "instruction input output response user assistant system",
    "a cohort of adapters trains together on one frozen base model",
    "0123456789 .,;:!?-()[]{}\"'",
]


def build_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (~350 tokens) that prepends <s> like Llama's when `bos` is true."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    if bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(family: str, vocab_size: int, hidden: int = 64, layers: int = 2):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    if family == "gemma":
        return GemmaConfig(**common, head_dim=hidden // 4)
    return _more_config(family, common)


def _more_config(family: str, common: dict):
    hidden = common["hidden_size"]
    if family == "qwen3":  # q/k norms; a head_dim of its own
        return Qwen3Config(**common, head_dim=hidden // 2, tie_word_embeddings=False)
    if family == "gemma2":  # soft-capped logits, sandwich norms, query_pre_attn_scalar
        return Gemma2Config(**common, head_dim=hidden // 4)
    if family == "gemma3":
        return Gemma3TextConfig(**common, head_dim=hidden // 4)
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return Phi3Config(**common, tie_word_embeddings=False)
    if family == "gpt2":  # Conv1D projections, learned positions, tied head
        return GPT2Config(vocab_size=common["vocab_size"], n_embd=hidden, n_layer=common["num_hidden_layers"],
                          n_head=4, n_positions=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "qwen2_moe":  # 4 experts, 2 a token, a shared expert
        return Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden,
                              shared_expert_intermediate_size=hidden, tie_word_embeddings=False)
    raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES + MORE_FAMILIES}")


def build_tiny_model(directory: Path, family: str = "llama", seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Save a random `family` model (fp32) and its tokenizer to `directory`; return the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_config(family, len(tokenizer), hidden=hidden, layers=layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` alpaca examples of varied lengths, deterministic in `seed`."""
    words = " ".join(_CORPUS).split()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        lengths = torch.randint(2, 12, (3,), generator=gen).tolist()
        picks = [[words[j] for j in torch.randint(0, len(words), (k,), generator=gen).tolist()] for k in lengths]
        rows.append(
            {"instruction": f"{i} " + " ".join(picks[0]), "input": " ".join(picks[1]), "output": " ".join(picks[2])}
        )
    return rows


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random Llama saved in a directory of its own, once per test module that imports this fixture."""
    return build_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """Import into a test module to run it on one intra-op thread: tiny models are faster that way, and far faster
    when other processes compete for the cores (OpenMP threads spin against each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_cohort(cohort, steps: int | None = None) -> dict[str, list]:
    """Step a lorafleet Cohort until every job is done (or `steps` steps); return job id -> its StepResults."""
    history: dict[str, list] = {}
    count = 0
    while cohort.active_jobs() and (steps is None or count < steps):
        for job_id, result in cohort.step().items():
            history.setdefault(job_id, []).append(result)
        count += 1
    return history


def step_with_saved_bytes(cohort) -> tuple[dict, int]:
    """One step of a lorafleet Cohort, and the bytes autograd saved for its backward: each storage a saved tensor
    holds, once, the base's weights left out (they are not activations)."""
    weights = {parameter.untyped_storage().data_ptr() for parameter in cohort.model.parameters()}
    storages = {}

    def count(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        results = cohort.step()
    return results, sum(storages.values())
