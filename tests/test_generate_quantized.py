"""Generation on quantized bases (issue 18): the engine's own forward (executor/generate.py) over bitsandbytes'
Linear4bit (nf4) and Linear8bitLt (int8) layers, on the CPU (bitsandbytes 0.50 runs both there), gives the tokens
that Hugging Face + PEFT's greedy generate gives on the same quantized base with the same adapter: for an exported
adapter loaded into a Generator on a quantized base, and for the live adapter of a job training in a QLoRA cohort.
Logits are compared too: the engine's first-token logits equal PEFT's forward within 1e-4 (fp32 compute, the same
dequantized weights; the engine's rows are packed differently, so not bitwise)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers_models import (  # noqa: F401 (fixtures: single_torch_thread is autouse)
    alpaca_rows,
    build_tiny_model,
    build_tokenizer,
    single_torch_thread,
    write_jsonl,
)
from peft import PeftModel
from transformers import AutoModelForCausalLM

import lorafleet.executor.generate as generate_module
from lorafleet.executor.cohort import Cohort
from lorafleet.executor.generate import GenerationRequest, Generator, Sampling
from lorafleet.executor.model import load_base, quantization_config
from lorafleet.executor.multilora import RowRouting
from lorafleet.scheduler.spec import parse_spec

EOS = 2
MAX_TOKENS = 10
PROMPTS = ("the quick brown fox", "question: what is two plus two? answer:")
LAYER_TYPES = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}
ADAPTER = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    root = tmp_path_factory.mktemp("quantized-generation")
    tokenizer = build_tokenizer()
    prompts = [tuple(tokenizer(text)["input_ids"]) for text in PROMPTS]
    return build_tiny_model(root / "llama", "llama"), write_jsonl(root / "train.jsonl", alpaca_rows(8, seed=2)), prompts


def qlora_cohort(model_dir, dataset, quantization: str, device: str = "cpu", dtype: str = "auto") -> Cohort:
    """A cohort on the quantized base with one LoRA job whose factors are moved off their init (B = 0 would make
    the adapter the base) by a fixed draw."""
    cohort = Cohort(model_dir, quantization=quantization, dtype=dtype, device=device)
    assert type(cohort.model.model.layers[0].mlp.up_proj).__name__ == LAYER_TYPES[quantization]
    spec = parse_spec({"base_model": str(model_dir), "dataset": "d", "quantization": quantization, "adapter": ADAPTER,
                       "dtype": dtype, "hyperparameters": {"batch_size": 2, "max_steps": 50}})
    cohort.add_job("job", spec, dataset)
    draw = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in cohort.jobs["job"].adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=draw) * 0.5)
    return cohort


def peft_on_quantized(model_dir, adapter_dir, quantization: str):
    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa",
                                                quantization_config=quantization_config(quantization, torch.float32))
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def peft_greedy(model, prompt: tuple[int, ...]) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                                           dtype=torch.long),
                             max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


def requests(prompts, adapter: str | None) -> list[GenerationRequest]:
    return [GenerationRequest(f"r{i}", prompt, adapter, Sampling(max_tokens=MAX_TOKENS))
            for i, prompt in enumerate(prompts)]


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_generation_on_a_quantized_base_gives_pefts_tokens_for_a_loaded_export_and_a_live_job(
        setup, tmp_path, quantization):
    model_dir, dataset, prompts = setup
    cohort = qlora_cohort(model_dir, dataset, quantization)
    export = cohort.export("job", tmp_path / "export")
    live = Generator(cohort.model, cohort.routing, eos_token_ids=(EOS,)).generate(requests(prompts, "job"))
    base, _ = load_base(model_dir, quantization=quantization)
    loaded_generator = Generator(base, RowRouting(), eos_token_ids=(EOS,))
    loaded_generator.load_adapter("tenant/export", export)
    loaded = loaded_generator.generate(requests(prompts, "tenant/export"))
    reference = peft_on_quantized(model_dir, export, quantization)
    for prompt, from_live, from_loaded in zip(prompts, live, loaded):
        want = peft_greedy(reference, prompt)
        assert list(from_live.token_ids) == want
        assert list(from_loaded.token_ids) == want
    with reference.disable_adapter():
        base_tokens = [peft_greedy(reference, prompt) for prompt in prompts]
    assert base_tokens != [list(c.token_ids) for c in live], "the adapter should change what is generated"


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_first_token_logits_on_a_quantized_base_are_pefts_within_1e_4(setup, tmp_path, quantization, monkeypatch):
    model_dir, dataset, prompts = setup
    cohort = qlora_cohort(model_dir, dataset, quantization)
    export = cohort.export("job", tmp_path / "export")
    seen = []
    real_next_tokens = generate_module.next_tokens
    monkeypatch.setattr(generate_module, "next_tokens",
                        lambda logits, *args: seen.append(logits.clone()) or real_next_tokens(logits, *args))
    Generator(cohort.model, cohort.routing).generate(requests(prompts[:1], "job"))
    reference = peft_on_quantized(model_dir, export, quantization)
    with torch.no_grad():
        want = reference(torch.tensor([prompts[0]])).logits[0, -1]
    torch.testing.assert_close(seen[0][0], want, rtol=0, atol=1e-4)


def test_on_the_triton_kernels_a_quantized_base_gives_the_reference_paths_tokens(setup, tmp_path, monkeypatch):
    """The kernel path the engine takes on a GPU (Triton's interpreter on the CPU): over a Linear4bit base the
    segmented kernels add the deltas to bitsandbytes' own output, and the tokens are the reference path's."""
    triton_lora = pytest.importorskip("lorafleet.kernels.triton_lora")
    from helpers_triton import interpreted

    import lorafleet.kernels as kernels
    from lorafleet.kernels import elementwise, triton_pooled

    model_dir, dataset, prompts = setup
    cohort = qlora_cohort(model_dir, dataset, "nf4")
    generator = Generator(cohort.model, cohort.routing, eos_token_ids=(EOS,))
    generator.load_adapter("exported", cohort.export("job", tmp_path / "export"))
    batch = [*requests(prompts[:1], "exported"), GenerationRequest("live", prompts[1], "job", Sampling(max_tokens=4))]
    want = generator.generate(batch)
    calls = []
    real = kernels.lora_delta_triton
    monkeypatch.setattr(kernels, "lora_delta_triton", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    with interpreted(triton_lora, elementwise, triton_pooled, LORAFLEET_TRITON="1"):  # the export's: pooled kernels
        got = generator.generate(batch)
    assert got == want
    assert calls, "the segmented kernels ran"
