"""Generation on quantized bases on a CUDA device (issue 18): bitsandbytes' CUDA nf4 and int8 layers under the
engine's kernel path (Triton LoRA kernels, pooled factors for a loaded export) give the greedy tokens of HF + PEFT on
the same quantized base, for a loaded export and a live QLoRA job. fp32 compute, so that both sides differ by kernel
rounding only. Skipped on CPU (tests/test_generate_quantized.py runs the same checks there)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from test_generate_quantized import MAX_TOKENS, qlora_cohort, requests
from test_generate_quantized import setup  # noqa: F401  (the fixture)
from transformers import AutoModelForCausalLM

from lorafleet.executor.generate import Generator
from lorafleet.executor.model import load_base, quantization_config
from lorafleet.executor.multilora import RowRouting

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

EOS = 2


def peft_greedy_on_cuda(model_dir, adapter_dir, quantization: str, prompt: tuple[int, ...]) -> list[int]:
    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", device_map={"": "cuda"},
                                                quantization_config=quantization_config(quantization, torch.float32))
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt], device="cuda"), max_new_tokens=MAX_TOKENS,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device="cuda"),
                             do_sample=False, eos_token_id=EOS, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_on_a_gpu_generation_on_a_quantized_base_gives_pefts_tokens(setup, tmp_path, quantization):  # noqa: F811
    model_dir, dataset, prompts = setup
    cohort = qlora_cohort(model_dir, dataset, quantization, device="cuda", dtype="float32")
    export = cohort.export("job", tmp_path / "export")
    live = Generator(cohort.model, cohort.routing, eos_token_ids=(EOS,)).generate(requests(prompts, "job"))
    base, _ = load_base(model_dir, quantization=quantization, dtype="float32", device="cuda")
    loaded_generator = Generator(base, RowRouting(), eos_token_ids=(EOS,))
    loaded_generator.load_adapter("tenant/export", export)
    loaded = loaded_generator.generate(requests(prompts, "tenant/export"))
    for prompt, from_live, from_loaded in zip(prompts, live, loaded):
        want = peft_greedy_on_cuda(model_dir, export, quantization, prompt)
        assert list(from_live.token_ids) == want
        assert list(from_loaded.token_ids) == want
