"""Pooled multi-adapter LoRA (kernels/pooled.py, kernels/triton_pooled.py): the Triton kernels under TRITON_INTERPRET=1
(CPU) against a float64 reference, the CPU path against `lora_delta_reference` bitwise, and the table's checks."""

from __future__ import annotations

import pytest
import torch

from helpers_triton import interpreted
from lorafleet import kernels
from lorafleet.kernels import lora_delta_reference, pooled_lora_delta, pooled_lora_delta_reference, pooled_lora_table

triton_pooled = pytest.importorskip("lorafleet.kernels.triton_pooled")

REL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# Two layers of different widths. Ragged segments: a gap first, an empty one, a one-row one, one over several 16-row
# tiles, rows left at the end; listed out of row order. Ranks per adapter and layer, 0 where it does not target it.
LAYER_DIMS = [(48, 40), (40, 24)]
SEGMENTS = [(40, 75), (3, 20), (20, 20), (21, 22), (22, 37)]
RANKS = [[4, 1, 8, 3, 16], [0, 2, 8, 0, 33]]


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def make_pool(dtype, seed, ranks=RANKS, layer_dims=LAYER_DIMS):
    """A flat pool holding every (layer, adapter) A and B at odd offsets, with the int64 [layers, adapters, 3] table
    of where they lie and the factors themselves (views into the pool, or None at rank 0)."""
    generator = torch.Generator().manual_seed(seed)
    pieces, offsets, factors, cursor = [], [], [], 5  # nothing at offset 0: an offset ignored would read garbage
    for (d_in, d_out), layer_ranks in zip(layer_dims, ranks):
        layer_offsets = []
        for rank in layer_ranks:
            a, b = torch.randn(rank, d_in, generator=generator), torch.randn(d_out, rank, generator=generator)
            layer_offsets.append((cursor, cursor + a.numel() + 3, rank) if rank else (0, 0, 0))
            pieces += [a.reshape(-1), torch.zeros(3), b.reshape(-1)] if rank else []
            cursor += a.numel() + 3 + b.numel() if rank else 0
        offsets.append(layer_offsets)
    pool = torch.cat([torch.randn(5, generator=generator), *pieces, torch.randn(7, generator=generator)]).to(dtype)
    for (d_in, d_out), layer_offsets in zip(layer_dims, offsets):
        layer_factors = [(pool[a:a + r * d_in].view(r, d_in), pool[b:b + d_out * r].view(d_out, r)) if r else None
                         for a, b, r in layer_offsets]
        factors.append(layer_factors)
    return pool, torch.tensor(offsets, dtype=torch.int64), factors


def make_table(offsets, segments=SEGMENTS, pool_elements=10**6, scales=None):
    scales = scales or [0.5 + j for j in range(len(segments))]
    return pooled_lora_table(segments, scales, offsets, LAYER_DIMS, pool_elements, torch.device("cpu"))


@pytest.fixture()
def interpreted_pooled_kernels():
    with interpreted(triton_pooled, LORAFLEET_TRITON="1"):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_add_every_layers_deltas_as_the_float64_reference(interpreted_pooled_kernels, dtype):
    pool, offsets, _ = make_pool(dtype, seed=1)
    table = make_table(offsets, pool_elements=pool.numel())
    generator = torch.Generator().manual_seed(2)
    for layer, (d_in, d_out) in enumerate(LAYER_DIMS):
        x = torch.randn(80, d_in, generator=generator).to(dtype)
        base = torch.randn(80, d_out, generator=generator).to(dtype)
        out = base.clone()
        assert pooled_lora_delta(x, pool, table, layer, out) is out
        delta = pooled_lora_delta_reference(x.double(), pool.double(), SEGMENTS, offsets[layer].tolist(),
                                            table.scales, d_out)
        assert rel_error(out - base, delta) < REL_TOL[dtype], layer
        touched = delta.abs().sum(1) > 0  # rows of a segment whose adapter targets the layer
        assert torch.equal(out[~touched], base[~touched])  # the others keep the base's bits, unread and unwritten


def test_the_kernels_run_when_asked_and_only_then(interpreted_pooled_kernels, monkeypatch):
    pool, offsets, _ = make_pool(torch.float32, seed=3)
    table = make_table(offsets, pool_elements=pool.numel())
    x = torch.randn(80, 48)
    calls = []
    real = kernels.pooled_lora_delta_triton
    monkeypatch.setattr(kernels, "pooled_lora_delta_triton", lambda *args: calls.append(1) or real(*args))
    on_kernels = pooled_lora_delta(x, pool, table, 0, torch.zeros(80, 40))
    monkeypatch.delenv("LORAFLEET_TRITON")
    on_reference = pooled_lora_delta(x, pool, table, 0, torch.zeros(80, 40))
    assert calls == [1]
    assert rel_error(on_kernels, on_reference.double()) < 1e-5


def test_the_cpu_path_gives_lora_delta_references_bits_for_the_same_factors():
    """Generation on the CPU gave PEFT's tokens through `lora_delta_reference` on the adapters' views; reading them
    through the table must not change one bit."""
    pool, offsets, factors = make_pool(torch.float32, seed=4)
    table = make_table(offsets, pool_elements=pool.numel())
    for layer, (d_in, d_out) in enumerate(LAYER_DIMS):
        x, base = torch.randn(80, d_in), torch.randn(80, d_out)
        targeting = [j for j, pair in enumerate(factors[layer]) if pair is not None]
        want = base + lora_delta_reference(x, [SEGMENTS[j] for j in targeting],
                                           [factors[layer][j][0] for j in targeting],
                                           [factors[layer][j][1] for j in targeting], [table.scales[j] for j in targeting])
        assert torch.equal(pooled_lora_delta(x, pool, table, layer, base.clone()), want), layer


def test_the_table_cuts_segments_into_tiles_of_one_adapter_and_pads_the_rank_to_a_power_of_two():
    _, offsets, _ = make_pool(torch.float32, seed=5)
    table = make_table(offsets)
    assert table.rank == 64  # the largest rank is 33
    tiles = [tuple(tile) for tile in table.tiles.tolist()]
    assert tiles == [(0, 40, 56), (0, 56, 72), (0, 72, 75), (1, 3, 19), (1, 19, 20), (3, 21, 22), (4, 22, 37)]
    assert torch.equal(table.offsets, offsets)
    assert table.scale_values.tolist() == [0.5, 1.5, 2.5, 3.5, 4.5]


@pytest.mark.parametrize("change, match", [
    (lambda offsets: offsets[1, 4].copy_(torch.tensor([10**6 - 100, 0, 33])), r"layer 1, segment 4: A at 999900"),
    (lambda offsets: offsets[0, 2].copy_(torch.tensor([-1, 0, 8])), r"layer 0, segment 2: A at -1"),
    (lambda offsets: offsets[0, 0].copy_(torch.tensor([0, 0, -2])), r"of rank -2"),
])
def test_a_table_entry_outside_the_pool_is_refused_by_layer_and_segment(change, match):
    _, offsets, _ = make_pool(torch.float32, seed=6)
    change(offsets)
    with pytest.raises(ValueError, match=match):
        make_table(offsets)


def test_bad_segments_and_calls_that_do_not_fit_the_table_are_refused_by_name():
    pool, offsets, _ = make_pool(torch.float32, seed=7)
    with pytest.raises(ValueError, match="overlap"):
        make_table(offsets, segments=[(40, 75), (3, 20), (20, 20), (21, 22), (21, 37)])
    with pytest.raises(ValueError, match="one scale per segment"):
        make_table(offsets, scales=[1.0])
    with pytest.raises(ValueError, match=r"offsets must be int64 \[layers, segments, 3\]"):
        make_table(offsets[:, :3])
    table = make_table(offsets, pool_elements=pool.numel())
    with pytest.raises(ValueError, match=r"x must be \[T, 48\] for layer 0"):
        pooled_lora_delta(torch.randn(80, 40), pool, table, 0, torch.zeros(80, 40))
    with pytest.raises(ValueError, match=r"out must be torch.float32 \[80, 24\]"):
        pooled_lora_delta(torch.randn(80, 40), pool, table, 1, torch.zeros(80, 40))
    with pytest.raises(ValueError, match=r"segment \(40, 75\) is not a row range inside x with 60 rows"):
        pooled_lora_delta(torch.randn(60, 48), pool, table, 0, torch.zeros(60, 40))
    with pytest.raises(ValueError, match="layer 2 is not in the table's 2 layers"):
        pooled_lora_delta(torch.randn(80, 48), pool, table, 2, torch.zeros(80, 40))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n_rows, n_adapters", [(512, 512), (4096, 8)])  # a decode step; a prefill
def test_compiled_kernels_on_the_gpu_match_the_float64_reference(n_rows, n_adapters):
    ranks = [[8 + 8 * (j % 3) for j in range(n_adapters)]] * 2  # 8, 16, 24: R = 32
    pool, offsets, _ = make_pool(torch.bfloat16, seed=8, ranks=ranks)
    pool = pool.cuda()
    bounds = torch.linspace(0, n_rows, n_adapters + 1).long().tolist()
    segments = list(zip(bounds, bounds[1:]))
    table = pooled_lora_table(segments, [0.5] * n_adapters, offsets, LAYER_DIMS, pool.numel(), torch.device("cuda"))
    for layer, (d_in, d_out) in enumerate(LAYER_DIMS):
        x = torch.randn(n_rows, d_in, device="cuda", dtype=torch.bfloat16)
        out = torch.zeros(n_rows, d_out, device="cuda", dtype=torch.bfloat16)
        pooled_lora_delta(x, pool, table, layer, out)
        want = pooled_lora_delta_reference(x.double(), pool.double(), segments, offsets[layer].tolist(), table.scales,
                                           d_out)
        assert rel_error(out, want) < REL_TOL[torch.bfloat16], layer
