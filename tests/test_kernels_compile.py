"""The LoRA gradient kernels compiled for the H100/H200 (sm_90) on this CPU. Triton's interpreter, which CI runs them
on, accepts code its compiler refuses (a helper whose two returns it types against each other: 7206c67), and CI has
no GPU."""

from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lorafleet.kernels import triton_lora  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)


def compile_for_sm90(kernel, pointers: dict[str, str], constexprs: dict) -> str:
    """The kernel's PTX; each argument that is neither a pointer nor a constexpr an i32."""
    if triton_lora.INTERPRETED:
        pytest.skip("the kernels were imported for Triton's interpreter in this process")
    names = kernel.arg_names
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()})
    return triton.compile(source, target=SM90).asm["ptx"]


@pytest.mark.parametrize("table", [False, True], ids=["into a stack", "through a table"])
def test_the_gradient_kernels_compile_for_sm90_with_relaxed_adds(table):
    gradients = "*i64" if table else "*fp32"  # with a table the stack's argument is the table
    dropout = {"seed_ptr": "*i64", "threshold_ptr": "*i64", "inv_keep_ptr": "*fp32", "starts_ptr": "*i32"}
    weight_grad = compile_for_sm90(
        triton_lora._weight_grad_kernel,
        {"left_ptr": "*bf16", "right_ptr": "*bf16", "grad_ptr": gradients, "table_ptr": gradients,
         "chunks_ptr": "*i32", **dropout},
        dict(R=64, BLOCK_M=64, BLOCK_N=64, DROPOUT=False, INPUT_PRECISION="tf32", DOT_FP32=False, TABLE=table))
    grad_h_and_b = compile_for_sm90(
        triton_lora._grad_h_and_b_kernel,
        {"dy_ptr": "*bf16", "b_ptr": "*bf16", "h_ptr": "*bf16", "grad_h_ptr": "*fp32", "grad_bt_ptr": gradients,
         "table_ptr": gradients, "scale_ptr": "*fp32", "chunks_ptr": "*i32"},
        dict(R=16, BLOCK_M=64, BLOCK_N=128, INPUT_PRECISION="tf32", DOT_FP32=False, TABLE=table))
    for ptx in (weight_grad, grad_h_and_b):
        adds = re.findall(r"(?:atom|red)\.global\.[\w.]*add\.f32", ptx)
        # relaxed: an acquire-release add waits on memory each time (docs/BENCHMARKS.md, runs H21-H23)
        assert adds and all(".relaxed." in add for add in adds), sorted(set(adds))
