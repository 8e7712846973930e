"""S-LoRA's unified paging: one preallocated pool of fixed-size pages for both the KV cache and the adapters.

Serving many adapters, GPU memory holds two kinds of data of changing size: each running request's KV cache (grows
with its length, freed when it ends) and the weights of the adapters the running requests use (loaded on demand,
ranks of every size). S-LoRA (Sheng et al. 2023) allocates both from one pool of pages, so memory moves between them
as the load changes instead of being split ahead of time, and nothing fragments into unusable gaps.

Here a page is one KV block: the K and V of `block_tokens` consecutive tokens of one request for every layer,
`[layers, 2, block_tokens, kv_heads, head_dim]` elements. A request holds a list of pages (its block table). A KV page
may have several holders (the choices of one request share their prompt's full blocks, vLLM's parallel sampling): it
counts its holders and is free again when the last one frees it. An adapter's factors are laid end to end over a
contiguous run of pages, so each factor is a plain tensor view the LoRA kernels read as they are. Runs for adapters
are taken from the bottom of the pool and KV pages from the top, so the KV churn of requests coming and going rarely
breaks the runs adapters need.

Adapters stay resident after their requests end and are evicted least recently used, only when pages are needed and
no running request uses them (pinned ones never are). Their master copies stay in host memory (the Generator's), so
an evicted adapter is copied in again on its next request, as S-LoRA fetches adapters from main memory.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch


class PoolFull(Exception):
    """Not enough free pages now (the caller evicts, waits for requests to finish, or refuses)."""


@dataclass(frozen=True)
class KvLayout:
    """The shape of one page as a KV block."""

    layers: int
    block_tokens: int
    kv_heads: int
    head_dim: int

    @property
    def page_elements(self) -> int:
        return self.layers * 2 * self.block_tokens * self.kv_heads * self.head_dim

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)


@dataclass(frozen=True)
class PoolUsage:
    """Pages by use; bytes are pages x `page_bytes`."""

    page_bytes: int
    total_pages: int
    kv_pages: int
    adapter_pages: int
    resident_adapters: int

    @property
    def free_pages(self) -> int:
        return self.total_pages - self.kv_pages - self.adapter_pages


# Each factor starts at a multiple of this many elements (128 bytes in bf16), the alignment vectorised loads want.
FACTOR_ALIGNMENT = 64


def _aligned(elements: int) -> int:
    return -(-elements // FACTOR_ALIGNMENT) * FACTOR_ALIGNMENT


@dataclass
class ResidentAdapter:
    start: int  # first page of its run
    pages: int
    views: list[torch.Tensor]  # the factors, in the order given to `place_adapter`
    pins: int = 0  # running requests that use it


class UnifiedPool:
    """Pages for KV blocks (`allocate_blocks`/`share_blocks`/`free_blocks`) and adapters (`place_adapter`/`pin`/
    `unpin`/`evict`).

    An evicted adapter's views stay valid tensors over pages that may now hold KV: its owner must route no row to it
    until it is placed again (a pinned adapter, one that running requests use, is never evicted).
    """

    def __init__(self, num_pages: int, layout: KvLayout, dtype: torch.dtype, device: torch.device):
        if num_pages < 1:
            raise ValueError(f"a pool of {num_pages} pages: it needs at least one page of "
                             f"{layout.page_elements} elements")
        self.layout = layout
        self.num_pages = num_pages
        self.buffer = torch.zeros(num_pages, layout.page_elements, dtype=dtype, device=device)
        self.page_bytes = layout.page_elements * dtype.itemsize
        self._free = bytearray(b"\x01") * num_pages  # 1: free (a bytes search finds runs of free pages in C)
        self._top = [-page for page in range(num_pages)]  # max-heap of pages for KV; stale entries skipped on pop
        heapq.heapify(self._top)
        self.kv_pages = 0  # pages held as KV, each counted once however many hold it
        self._kv_holders = [0] * num_pages  # per page: how many block tables hold it (0: not a KV page)
        self.adapter_pages = 0
        self.adapters: OrderedDict[str, ResidentAdapter] = OrderedDict()  # least recently used first
        self.evictions = 0

    def kv_view(self) -> torch.Tensor:
        """The pool as KV blocks: [pages, layers, 2 (K, V), block_tokens, kv_heads, head_dim]."""
        layout = self.layout
        return self.buffer.view(self.num_pages, layout.layers, 2, layout.block_tokens, layout.kv_heads,
                                layout.head_dim)

    def free_pages(self) -> int:
        return self.num_pages - self.kv_pages - self.adapter_pages

    def usage(self) -> PoolUsage:
        return PoolUsage(self.page_bytes, self.num_pages, self.kv_pages, self.adapter_pages, len(self.adapters))

    # KV blocks

    def allocate_blocks(self, count: int) -> list[int]:
        """`count` pages for KV, one holder each (the caller), evicting unpinned adapters if needed; PoolFull if they
        cannot be had now."""
        while self.free_pages() < count:
            if not self._evict_one():
                raise PoolFull(f"{count} KV pages wanted, {self.free_pages()} free")
        pages = []
        while len(pages) < count:
            page = -heapq.heappop(self._top)
            if self._free[page]:
                self._free[page] = 0
                self._kv_holders[page] = 1
                pages.append(page)
        self.kv_pages += count
        return pages

    def share_blocks(self, pages: list[int]) -> None:
        """One more holder of each of these KV pages (already held): they stay until every holder freed them.
        Refuses, changing nothing, a page that is not held as KV (free, or an adapter's)."""
        for page in pages:
            if not 0 <= page < self.num_pages or not self._kv_holders[page]:
                raise ValueError(f"page {page} is not a held KV page: it cannot be shared")
        for page in pages:
            self._kv_holders[page] += 1

    def free_blocks(self, pages: list[int]) -> None:
        """One holder fewer for each of these KV pages; a page whose last holder freed it is free again. Refuses,
        changing nothing, a page freed more times than it is held (a double free, or a page that is not KV)."""
        for page, times in Counter(pages).items():
            held = self._kv_holders[page] if 0 <= page < self.num_pages else 0
            if times > held:
                raise ValueError(f"KV page {page} freed {times} times but held by {held}: a double free, or not a "
                                 "KV page")
        for page in pages:
            self._kv_holders[page] -= 1
            if not self._kv_holders[page]:
                self._release(page)
                self.kv_pages -= 1

    def kv_holders(self, page: int) -> int:
        """How many block tables hold the page (0: free, or an adapter's)."""
        return self._kv_holders[page]

    def _release(self, page: int) -> None:
        self._free[page] = 1
        heapq.heappush(self._top, -page)
        if len(self._top) > 2 * self.num_pages:  # pages taken by adapter runs stay in the heap: rebuild it
            self._top = [-free for free in range(self.num_pages) if self._free[free]]
            heapq.heapify(self._top)

    # Adapters

    @staticmethod
    def pages_for_factors(shapes: list[tuple[int, ...]], page_elements: int) -> int:
        """Pages a run holding factors of these shapes takes."""
        return -(-sum(_aligned(math.prod(shape)) for shape in shapes) // page_elements)

    def place_adapter(self, key: str, factors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copy `factors` into a run of pages (evicting unpinned adapters if needed) and return their views in
        the pool; the adapter is resident, most recently used, unpinned. PoolFull if no run can be had now."""
        if key in self.adapters:
            raise ValueError(f"adapter {key!r} is already in the pool")
        count = self.pages_for_factors([tuple(f.shape) for f in factors], self.layout.page_elements)
        start = self._find_run(count)
        while start is None:
            if not self._evict_one():
                raise PoolFull(f"a run of {count} pages wanted for adapter {key!r}, {self.free_pages()} pages free")
            start = self._find_run(count)
        self._free[start:start + count] = bytes(count)
        flat = self.buffer[start:start + count].view(-1)
        views, offset = [], 0
        for factor in factors:
            view = flat[offset:offset + factor.numel()].view(factor.shape)
            view.copy_(factor)
            views.append(view)
            offset += _aligned(factor.numel())
        self.adapters[key] = ResidentAdapter(start, count, views)
        self.adapter_pages += count
        return views

    def _find_run(self, count: int) -> int | None:
        start = self._free.find(b"\x01" * count)
        return None if start < 0 else start

    def resident(self, key: str) -> bool:
        return key in self.adapters

    def pin(self, key: str) -> None:
        """A request uses the adapter: it is not evicted until every such request ends (`unpin`)."""
        self.adapters[key].pins += 1
        self.adapters.move_to_end(key)

    def unpin(self, key: str) -> None:
        self.adapters[key].pins -= 1

    def evict(self, key: str) -> None:
        """Take an unpinned adapter out of the pool, its pages freed."""
        adapter = self.adapters[key]
        if adapter.pins:
            raise RuntimeError(f"adapter {key!r} is in use by {adapter.pins} running requests")
        del self.adapters[key]
        self.adapter_pages -= adapter.pages
        self.evictions += 1
        for page in range(adapter.start, adapter.start + adapter.pages):
            self._release(page)

    def _evict_one(self) -> bool:
        """Evict the least recently used unpinned adapter; False when there is none."""
        key = next((key for key, adapter in self.adapters.items() if not adapter.pins), None)
        if key is None:
            return False
        self.evict(key)
        return True
