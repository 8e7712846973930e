"""Our `kernels/` folder must never shadow Hugging Face's `kernels` package (transformers and bitsandbytes import it).

The check runs in a fresh interpreter with `-P` from a scratch directory, as every lorafleet process is started.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent(
    """
    import importlib.util, json, sys
    from pathlib import Path

    import transformers.integrations.hub_kernels  # noqa: F401  (imports `kernels` when it is installed)
    import lorafleet.kernels

    repo_kernels = Path(sys.argv[1]).resolve()
    assert Path(lorafleet.kernels.__file__).resolve().parent == repo_kernels, lorafleet.kernels.__file__
    spec = importlib.util.find_spec("kernels")
    if spec is not None:
        import kernels
        origin = Path(kernels.__file__).resolve()
        assert repo_kernels not in origin.parents, f"`import kernels` found our folder: {origin}"
        assert not hasattr(kernels, "lora_delta"), "`import kernels` is lorafleet's package"

    import torch
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    weight = torch.randn(32, 64)
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes
    assert layer.weight.dtype == torch.uint8
    x = torch.randn(5, 64)
    with torch.no_grad():
        out = layer(x)
    dequantized = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    reference = x @ dequantized.t() + layer.bias
    print(json.dumps({
        "max_err": (out - reference).abs().max().item(),
        "ref_scale": reference.abs().max().item(),
        "quant_err": (dequantized - weight).abs().max().item(),
    }))
    """
)


def test_hf_kernels_and_bitsandbytes_see_their_own_packages(tmp_path):
    result = subprocess.run(
        [sys.executable, "-P", "-c", PROBE, str(REPO / "kernels")],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["max_err"] <= 1e-4 * max(1.0, numbers["ref_scale"])
    assert 0 < numbers["quant_err"] < 1.0  # it really was quantized to 4 bits, and not garbage
