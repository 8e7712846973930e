"""Many-adapter generation (S-LoRA): requests for many adapters decoded together on one shared frozen base.

A `Generator` serves requests whose adapters are either PEFT directories it loaded (`load_adapter`) or the live
adapters of jobs training in the cohort that owns the model (a job id: eval samples). Each forward runs the requests
of every adapter at once: rows grouped by adapter, `RowRouting.segments` naming each adapter's rows. Live jobs'
adapters go through the segmented LoRA kernels (`lora_delta` on the CPU) as in training; loaded adapters are read
in place from the pool (S-LoRA's MBGMV, `pooled_lora_delta`) through one table per forward of where each adapter's
factors lie (`PooledAdapters`), so nothing is stacked per step however many adapters run.

The decode path is our own forward over the HF modules (gpt-fast style): embeddings; per layer norm, q/k/v through
the multi-adapter layers, rotary, the new K/V written into the paged cache, attention, o_proj, MLP; the final norm
and the LM head only on the rows whose next token is sampled. Each round is one forward over every running request
(vLLM's mixed batches): a decoding request's last token, and the next chunk of each prompt being prefilled, within
`max_prefill_tokens` prompt tokens a round; the base weights are read once for both, a long prompt is prefilled over
several rounds (its later chunks attending to its cached earlier ones) while the others keep decoding, and it samples
its first token after its last chunk. Requests join as others finish (continuous batching), within the pages of one
`UnifiedPool` that holds both the KV cache and the resident adapters (executor/kv_pool.py).

The choices of one request (a `prompt_group`: the same prompt and adapter) share their prompt's cache, prefilled once
(vLLM's parallel sampling): the first choice admitted prefills the whole prompt; each other one holds references to its
full prompt blocks but the last (the pool counts a page's holders), waits until they are cached, then computes only
the rest of the prompt (at most one block, as a later chunk over the shared cache: that block's last row gives its
first logits) into a block of its own, and decodes into blocks of its own. An n-choice request of a P-token prompt
holds about P + n x (max_tokens + 1 block) tokens of pages instead of n x (P + max_tokens), and prefills P + (n - 1)
x (at most one block) rows instead of n x P. Each choice still draws with its own generator, so its tokens are those
it gets unshared up to floating-point rounding: not promised bitwise, as its last block and the shared blocks are
computed in other forwards than its own prefill would be (other kernels, other batches); greedy tokens on the CPU
tests equal PEFT's.

A request may carry a soft prompt (a LoPA job's: `GenerationRequest.soft_prompt`, [m, hidden]): its first m prompt
positions take those input embeddings instead of their (placeholder) tokens' and are cached like any position, so a
LoPA request batches, chunks and shares its prompt as any other; it routes to no adapter (LoPA touches no layer).

Nothing here changes training: a live job's adapter runs in eval mode (no dropout) under no_grad, no global RNG is
drawn (sampling uses each request's own generator), and the routing is restored afterwards. A Generator serves one
call at a time, between cohort steps (it sets the shared routing). Its pool is allocated once, at construction:
beside a training cohort give it `pool_bytes` (the default takes GPU_POOL_SHARE of the free GPU memory).

    generator = Generator(cohort.model, cohort.routing, eos_token_ids=(tokenizer.eos_token_id,), pool_bytes=4 << 30)
    generator.load_adapter("tenant-a/v3", Path("/artifacts/.../adapter"))
    completions = generator.generate([GenerationRequest("r1", prompt_ids, "tenant-a/v3", Sampling(max_tokens=32)),
                                      GenerationRequest("r2", prompt_ids, "job-17", Sampling(temperature=0.7, seed=1))])
"""

from __future__ import annotations

import json
import math
import random
import secrets
from collections import deque
from collections.abc import Callable, Collection
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lorafleet.executor.attention import varlen_attention, varlen_supported
from lorafleet.executor.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from lorafleet.executor.kv_pool import KvLayout, PoolFull, PoolUsage, UnifiedPool
from lorafleet.executor.model import packed_attention
from lorafleet.executor.multilora import MultiLoraLinear, RowRouting, shared_input_projections, wrap_targets
from lorafleet.kernels import PooledLoraTable, pooled_lora_delta, pooled_lora_table, rotary
from lorafleet.scheduler.spec import GENERATION_FAMILIES

SUPPORTED_FAMILIES = GENERATION_FAMILIES  # defined once, in the spec: submission refuses eval_samples on others
LOADED_PREFIX = "gen:"  # loaded adapters' keys in the layers' `adapters` dicts: job ids never start with it
BLOCK_TOKENS = 16
CPU_POOL_BYTES = 64 << 20
GPU_POOL_SHARE = 0.4  # of the free GPU memory, when no pool size is given
# prompt tokens one forward takes at most (a longer prompt is prefilled in chunks over several rounds): bounds its
# activations, and how long a round of new prompts holds up the running requests' next tokens
MAX_PREFILL_TOKENS = 16384
# queries of a later chunk that attend at once: their mask (and scores) over the request's cache are [rows x query
# heads per K/V head, its cached tokens], bounded here instead of by the whole chunk
CHUNK_ATTENTION_ROWS = 512


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    # a request's own generator: the same request gives the same tokens whatever it is batched with
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's eos (the Generator is given eos ids)
    # the log-prob of each generated token and of the `logprobs` likeliest tokens at its position (None: none are
    # computed, at no cost): the model's own distribution, log_softmax of its logits before temperature and top_p
    logprobs: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    adapter: str | None  # a key the Generator can route to: a loaded adapter, or a live job's id; None: the base alone
    sampling: Sampling = Sampling()
    # requests of one group (the choices of one request: serving names them by its id) have the same prompt and
    # adapter, checked: they share the prompt's cached blocks, prefilled once (the module doc). None: shares nothing
    prompt_group: str | None = None
    # [m, hidden]: the input embeddings of the sequence's first m positions, in place of their token ids' (a LoPA
    # job's soft prompt, computed from the prompt by its caller: `prompt_ids` then starts with m placeholder ids)
    soft_prompt: torch.Tensor | None = None


@dataclass(frozen=True)
class Completion:
    request_id: str
    token_ids: tuple[int, ...]  # generated, without the prompt, without the stop/eos token
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    logprobs: tuple[TokenLogprobs, ...] | None = None  # one per generated token, with `Sampling.logprobs`


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-prob and the likeliest tokens at its position (the most likely first)."""

    logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


# Loading PEFT directories


@dataclass
class HostAdapter:
    """A loaded adapter's master copy in host memory: module name -> (A [r, d_in], B [d_out, r]), fp32."""

    scale: float
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(t.shape) for pair in self.factors.values() for t in pair]


def read_peft_adapter(directory: Path, layer_shapes) -> HostAdapter:
    """A PEFT directory as `Cohort.export` writes it: LoRA (rsLoRA, NOLA's computed factors) or VeRA.

    `layer_shapes(names)` gives module name -> (d_in, d_out) of the base (VeRA's shared projections are sliced to
    each layer). Raises ValueError naming what is not served (DoRA, expert parameters, other PEFT types, a GaLore
    job's full-model export)."""
    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        what = ("a full model (a GaLore job's export is one: serve it as a base)"
                if (directory / "config.json").is_file() else "no adapter")
        raise ValueError(f"{directory}: no {ADAPTER_CONFIG}, {what}; generation serves PEFT LoRA and VeRA adapters")
    config = json.loads(config_path.read_text())
    kind = config.get("peft_type")
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    if kind == "LORA":
        return _read_lora(directory, config, tensors)
    if kind == "VERA":
        return _read_vera(config, tensors, layer_shapes)
    raise ValueError(f"{directory}: adapter type {kind!r} is not served; generation serves LORA and VERA adapters")


def _read_lora(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> HostAdapter:
    if config.get("use_dora"):
        raise ValueError(f"{directory}: adapter type DoRA is not served by generation (LoRA, rsLoRA, NOLA and VeRA "
                         "are); merge it into its base with `lorafleet merge` and serve that")
    if config.get("target_parameters"):
        raise ValueError(f"{directory}: adapters of MoE expert parameters (target_parameters) are not served")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{directory}: per-layer ranks or alphas (rank_pattern, alpha_pattern) are not served")
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    factors = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            factors[module] = (a.float(), tensors[key.replace(".lora_A.", ".lora_B.")].float())
    return HostAdapter(scale, factors)


def _read_vera(config: dict, tensors: dict[str, torch.Tensor], layer_shapes) -> HostAdapter:
    """VeRA as LoRA factors: A = diag(λ_d) A_shared[:, :d_in], B = diag(λ_b) B_shared[:d_out], scale 1."""
    vera_a, vera_b = tensors["base_model.vera_A"].float(), tensors["base_model.vera_B"].float()
    modules = [key.removeprefix("base_model.model.").removesuffix(".vera_lambda_d")
               for key in tensors if key.endswith(".vera_lambda_d")]
    shapes = layer_shapes(modules)
    factors = {}
    for module in modules:
        d_in, d_out = shapes[module]
        lambda_d = tensors[f"base_model.model.{module}.vera_lambda_d"].float()
        lambda_b = tensors[f"base_model.model.{module}.vera_lambda_b"].float()
        factors[module] = (lambda_d[:, None] * vera_a[:, :d_in], lambda_b[:, None] * vera_b[:d_out])
    return HostAdapter(1.0, factors)


# The forward


@dataclass(frozen=True)
class PromptSpans:
    """Spans that begin their prompt (a whole prompt or its first chunk): each attends causally within itself."""

    rows: slice | torch.Tensor  # their rows, span after span
    lengths: list[int]


@dataclass(frozen=True)
class PagedRows:
    """One-row spans (a decode step, or a one-token chunk): each attends over its request's cache up to itself."""

    rows: slice | torch.Tensor  # [B]
    block_tables: torch.Tensor  # [B, blocks]
    context_lengths: torch.Tensor  # [B] its request's cached tokens, its own included


@dataclass(frozen=True)
class ChunkSpan:
    """A later chunk of a prompt (or a piece of one, CHUNK_ATTENTION_ROWS): attends causally over its request's
    cache, its earlier chunks and itself."""

    rows: slice
    block_table: torch.Tensor  # [blocks] of its request, up to its last row
    positions: torch.Tensor  # [rows]


@dataclass
class ForwardRows:
    """One forward's rows: what they hold, where their K/V go, and how they attend.

    The rows are grouped by adapter (`segments`); a request's rows are one span of its sequence, prefill or decode,
    and each kind of span attends its own way (`attend`)."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_pages: torch.Tensor  # [T] page of each row's K/V
    slot_offsets: torch.Tensor  # [T] its place in the page
    segments: dict[str, tuple[int, int]]  # routing key -> rows
    logit_rows: torch.Tensor  # rows whose next token is sampled
    prompts: PromptSpans | None = None
    paged: PagedRows | None = None
    chunks: list[ChunkSpan] = field(default_factory=list)
    soft_rows: torch.Tensor | None = None  # rows whose input embeddings are `soft_embeddings`, not their tokens'
    soft_embeddings: torch.Tensor | None = None


@dataclass(frozen=True)
class PooledAdapters:
    """A forward's loaded adapters for `RowRouting.pooled`: each layer they target adds their deltas, read in place
    from the pool's buffer through the forward's table (kernels/pooled.py)."""

    pool: torch.Tensor  # the pool's buffer, flat
    table: PooledLoraTable
    layer_index: dict[str, int]  # module name -> its layer in the table

    def __call__(self, layer: str, x: torch.Tensor, out: torch.Tensor) -> None:
        index = self.layer_index.get(layer)
        if index is not None:
            pooled_lora_delta(x, self.pool, self.table, index, out)


def prefill_attention(q, k, v, lengths: list[int], scaling: float, window: int | None) -> torch.Tensor:
    """Causal attention within each packed prompt: q [T, H, D], k/v [T, H_kv, D] -> [T, H, D]."""
    boundaries = torch.tensor([0, *lengths], device=q.device).cumsum(0)
    if varlen_supported(q, k, scaling, window):
        return varlen_attention(q, k, v, boundaries, max(lengths), scaling, window)
    heads_first = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
    return packed_attention(None, *heads_first, None, scaling=scaling, sliding_window=window,
                            cu_seq_lens_q=boundaries, max_length_q=max(lengths))[0][0]


def paged_attention(q, kv_layer, block_tables, query_positions, scaling: float, window: int | None) -> torch.Tensor:
    """Queries over their requests' paged caches: q [B, n, H, D] (n rows of each request), kv_layer [pages, 2,
    block, H_kv, D], block_tables [B, blocks], query_positions [B, n] -> [B, n, H, D].

    The blocks of each request are gathered into [B, H_kv, S, D] (S: the widest table's blocks); a query sees the
    cached positions up to its own (within the window when there is one). The query heads that share a K/V head
    (consecutive, as HF's repeat_kv pairs them) attend as that head's rows of queries: K/V are never repeated per
    query head."""
    batch, rows, heads, head_dim = q.shape
    kv_heads = kv_layer.shape[-2]
    groups = heads // kv_heads
    gathered = kv_layer[block_tables]  # [B, blocks, 2, block, H_kv, D]
    keys, values = (gathered[:, :, i].reshape(batch, -1, kv_heads, head_dim).transpose(1, 2) for i in (0, 1))
    cached = torch.arange(keys.shape[2], device=q.device)
    visible = cached <= query_positions[..., None]  # [B, n, S]
    if window is not None:
        visible &= cached > query_positions[..., None] - window
    grouped = q.reshape(batch, rows, kv_heads, groups, head_dim).transpose(1, 2)  # [B, H_kv, n, H / H_kv, D]
    # [B, 1, n * H / H_kv, S]: a view (the mask broadcast over the group) for one query a request
    mask = visible[:, :, None].expand(-1, -1, groups, -1).reshape(batch, 1, rows * groups, -1)
    out = F.scaled_dot_product_attention(grouped.reshape(batch, kv_heads, rows * groups, head_dim), keys, values,
                                         attn_mask=mask, scale=scaling)
    return out.reshape(batch, kv_heads, rows, groups, head_dim).transpose(1, 2).reshape(q.shape)


def decode_attention(q, kv_layer, block_tables, context_lengths, scaling: float, window: int | None) -> torch.Tensor:
    """One query per request, its last cached position: q [B, H, D] -> [B, H, D]."""
    positions = (context_lengths - 1)[:, None]
    return paged_attention(q[:, None], kv_layer, block_tables, positions, scaling, window)[:, 0]


def attend(q, k, v, kv_layer, rows: ForwardRows, scaling: float, window: int | None) -> torch.Tensor:
    """Every row's attention, each kind of span its own way: q [T, H, D], k/v [T, H_kv, D] (already in the cache
    too) -> [T, H, D]. A prompt's first rows attend within themselves, without reading the cache (flash varlen on
    the GPU)."""
    parts = []  # (rows, their attention)
    if rows.prompts is not None:
        index = rows.prompts.rows
        parts.append((index, prefill_attention(q[index], k[index], v[index], rows.prompts.lengths, scaling, window)))
    if rows.paged is not None:
        paged = rows.paged
        parts.append((paged.rows, decode_attention(q[paged.rows], kv_layer, paged.block_tables,
                                                   paged.context_lengths, scaling, window)))
    for chunk in rows.chunks:
        parts.append((chunk.rows, paged_attention(q[chunk.rows][None], kv_layer, chunk.block_table[None],
                                                  chunk.positions[None], scaling, window)[0]))
    if len(parts) == 1:  # one kind of span (a round of decode steps alone, say): its rows are all, in order
        return parts[0][1]
    out = torch.empty_like(q)
    for index, part in parts:
        out[index] = part
    return out


# Sampling


def next_tokens(logits: torch.Tensor, samplings: list[Sampling], uniforms: list[float | None]) -> list[int]:
    """Each row's next token: greedy at temperature 0, else drawn from its nucleus by its uniform in [0, 1).

    The rows are sampled together (one sort, one search), each by the number its request's own generator gave:
    no per-request launches, and no draw depends on the other rows."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    rows = [row for row, sampling in enumerate(samplings) if sampling.temperature > 0]
    if rows:
        def column(values):
            return torch.tensor(values, dtype=torch.float32, device=logits.device)[:, None]

        index = torch.tensor(rows, device=logits.device)
        temperature = column([samplings[row].temperature for row in rows])
        top_p = column([samplings[row].top_p for row in rows])
        tokens[index] = sample_nucleus(logits[index] / temperature, top_p, column([uniforms[row] for row in rows]))
    return tokens.tolist()


def sample_nucleus(logits: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row a draw from softmax(logits) restricted to the smallest set of top tokens whose mass reaches top_p,
    by inverting its cumulative distribution at `uniform` ([R, 1] each)."""
    sorted_probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # the mass ranked above each token
    kept = sorted_probs.masked_fill(before >= top_p, 0)  # the top token always stays (nothing above it)
    cumulative = kept.cumsum(dim=-1)
    picked = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True)
    return order.gather(1, picked.clamp(max=logits.shape[-1] - 1)).squeeze(1)


def token_logprobs(logits: torch.Tensor, samplings: list[Sampling], tokens: list[int]) -> dict[int, TokenLogprobs]:
    """Row -> its chosen token's log-prob and the top alternatives, for the rows whose sampling asks (the others cost
    nothing). The model's own distribution (log_softmax of its fp32 logits), not the tempered or truncated one the
    token was drawn from: OpenAI's log-probs are those of the model, whatever the sampling options."""
    rows = [row for row, sampling in enumerate(samplings) if sampling.logprobs is not None]
    if not rows:
        return {}
    index = torch.tensor(rows, device=logits.device)
    logprobs = torch.log_softmax(logits[index].float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor([tokens[row] for row in rows], device=logits.device)[:, None])
    widest = min(max(samplings[row].logprobs for row in rows), logits.shape[-1])
    top_values, top_ids = logprobs.topk(widest, dim=-1) if widest else (logprobs[:, :0], logprobs[:, :0].long())
    chosen, top_values, top_ids = chosen[:, 0].tolist(), top_values.tolist(), top_ids.tolist()  # one copy to host
    found = {}
    for i, row in enumerate(rows):
        k = samplings[row].logprobs
        found[row] = TokenLogprobs(chosen[i], tuple(top_ids[i][:k]), tuple(top_values[i][:k]))
    return found


# Requests under way


@dataclass
class Running:
    index: int  # in the caller's list
    request: GenerationRequest
    route: str | None  # its key in the layers' adapters dicts (and the routing), None for the base alone
    pages: list[int]  # its block table
    rng: random.Random  # its own stream of uniforms for sampling
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prefilled: int = 0  # prompt tokens whose K/V are cached: a long prompt is prefilled a chunk a round
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # of `generated`, when its sampling asks
    # a choice that shares another's full prompt blocks: the request that prefills them, and the prompt tokens they
    # hold (its `prefilled` from admission on: it computes only the rest of the prompt)
    prompt_source: Running | None = None
    shared_tokens: int = 0

    @property
    def ready(self) -> bool:
        """Whether its rows can run: a choice sharing another's prompt blocks waits until that one cached them."""
        return self.prompt_source is None or self.prompt_source.prefilled >= self.shared_tokens

    @property
    def cached_tokens(self) -> int:
        """Tokens whose K/V are in the cache (the position of its next row): the prompt's prefilled part, and every
        generated token but the last."""
        return self.prefilled + max(0, len(self.generated) - 1)

    @property
    def prompt_left(self) -> int:
        return len(self.request.prompt_ids) - self.prefilled

    def completion(self) -> Completion:
        asked = self.request.sampling.logprobs is not None
        return Completion(self.request.request_id, tuple(self.generated), self.finish_reason,
                          len(self.request.prompt_ids), tuple(self.logprobs) if asked else None)


@dataclass
class Span:
    """A request's rows in one forward: `tokens` of its sequence from position `start` on."""

    request: Running
    start: int
    tokens: tuple[int, ...]
    end: int = field(init=False)  # a field, not a property: read several times per row per round

    def __post_init__(self):
        self.end = self.start + len(self.tokens)

    @property
    def samples(self) -> bool:
        """Whether its last row's logits give the request's next token: a decode step, or its prompt's last chunk."""
        return self.end >= len(self.request.request.prompt_ids)


class Generator:
    """Serves `generate` on a cohort's model (shared, no second copy) or a plain HF base (see the module doc)."""

    def __init__(self, model, routing: RowRouting, eos_token_ids: tuple[int, ...] = (), pool_bytes: int | None = None,
                 max_prefill_tokens: int = MAX_PREFILL_TOKENS):
        family = getattr(model.config, "model_type", type(model).__name__)
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(f"generation supports the Llama-like decoders {SUPPORTED_FAMILIES}; "
                             f"this model is {family!r}")
        foreign = [m.name for m in model.modules() if isinstance(m, MultiLoraLinear) and m.routing is not routing]
        if foreign:
            raise ValueError(f"this model's multi-adapter layers ({foreign[0]}, ...) follow another RowRouting: "
                             "pass the one they were wrapped with (a cohort's: cohort.routing)")
        self.model, self.routing = model, routing
        self.decoder = model.model
        self.eos_token_ids = tuple(eos_token_ids)
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be at least 1, not {max_prefill_tokens}")
        self.max_prefill_tokens = max_prefill_tokens
        self.device = self.decoder.embed_tokens.weight.device
        attention = self.decoder.layers[0].self_attn
        layout = KvLayout(len(self.decoder.layers), BLOCK_TOKENS, model.config.num_key_value_heads,
                          attention.head_dim)
        dtype = self.decoder.embed_tokens.weight.dtype
        page_bytes = layout.page_elements * dtype.itemsize
        self.pool = UnifiedPool(self._pool_bytes(pool_bytes) // page_bytes, layout, dtype, self.device)
        self._host: dict[str, HostAdapter] = {}  # loaded adapters, by key
        self._layers: dict[str, MultiLoraLinear] = {}  # module name -> layer, for every layer a loaded adapter targets
        # resident adapter's route -> int64 [layers, 3]: per layer of `_layers` (in order, as placed) where its A and
        # B start in the pool's flat buffer and its rank (0s for a layer it does not target)
        self._pool_offsets: dict[str, torch.Tensor] = {}
        self._closed = False

    def _pool_bytes(self, pool_bytes: int | None) -> int:
        if pool_bytes is not None:
            return pool_bytes
        if self.device.type == "cuda":
            return int(torch.cuda.mem_get_info(self.device)[0] * GPU_POOL_SHARE)
        return CPU_POOL_BYTES

    def pool_usage(self) -> PoolUsage:
        return self.pool.usage()

    # Adapters

    def load_adapter(self, key: str, directory: Path) -> None:
        """Read a PEFT LoRA/VeRA directory into host memory under `key` (replacing one of that key); it is copied
        into the pool when a request needs it. Raises ValueError for what is not served, or a module the base lacks."""
        host = read_peft_adapter(Path(directory), self._layer_shapes)
        self._layer_shapes(list(host.factors))  # wraps the targets, refusing a module the base lacks
        for name, (a, b) in host.factors.items():
            d_in, d_out = self._layers[name].in_features, self._layers[name].out_features
            if a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
                raise ValueError(f"{directory}: {name} factors A {tuple(a.shape)} B {tuple(b.shape)} do not fit the "
                                 f"base's [{d_out}, {d_in}] layer")
        pages = self.pool.pages_for_factors(host.shapes(), self.pool.layout.page_elements)
        if pages > self.pool.num_pages:
            raise ValueError(f"{directory}: the adapter takes {pages} pages, the pool has {self.pool.num_pages}")
        if key in self._host:
            self.unload_adapter(key)
        self._host[key] = host

    def unload_adapter(self, key: str) -> None:
        if key not in self._host:
            raise KeyError(f"no adapter {key!r} is loaded")
        if self.pool.resident(LOADED_PREFIX + key):
            self.pool.evict(LOADED_PREFIX + key)
        self._pool_offsets.pop(LOADED_PREFIX + key, None)
        del self._host[key]

    def has_adapter(self, key: str) -> bool:
        return key in self._host or key in self._live_adapters()

    def _layer_shapes(self, names: list[str]) -> dict[str, tuple[int, int]]:
        """Module name -> (d_in, d_out), wrapping each as a multi-adapter layer (once) on a plain base."""
        missing = [name for name in names if name not in self._layers]
        if missing:
            try:
                self._layers.update(wrap_targets(self.model, tuple(missing), self.routing))
            except ValueError as exc:
                raise ValueError(f"the adapter does not fit this base: {exc}") from None
        return {name: (self._layers[name].in_features, self._layers[name].out_features) for name in names}

    def _live_adapters(self) -> dict:
        """Job id -> adapter of the jobs training on this model, as the cohort put them in its layers (one scan)."""
        live = {}
        for module in self.model.modules():
            if isinstance(module, MultiLoraLinear):
                live.update({key: adapter for key, adapter in module.adapters.items()
                             if not key.startswith(LOADED_PREFIX)})
        return live

    def _route(self, key: str | None, live: dict) -> str | None:
        """The routing key of an adapter key: a loaded adapter's, else a live job's id; ValueError when neither."""
        if key is None:
            return None
        if key in self._host:
            return LOADED_PREFIX + key
        if key in live:
            return key
        raise ValueError(f"unknown adapter {key!r}: neither loaded (load_adapter) nor a job training on this base")

    def _make_resident(self, route: str) -> None:
        """Copy a loaded adapter into the pool if it is not there, and note where each of its factors lies."""
        if self.pool.resident(route):
            return
        host = self._host[route.removeprefix(LOADED_PREFIX)]
        views = self.pool.place_adapter(route, [t for pair in host.factors.values() for t in pair])
        origin = self.pool.buffer.storage_offset()
        layer_index = {name: i for i, name in enumerate(self._layers)}
        offsets = torch.zeros(len(self._layers), 3, dtype=torch.int64)
        for i, name in enumerate(host.factors):
            a, b = views[2 * i], views[2 * i + 1]
            offsets[layer_index[name]] = torch.tensor([a.storage_offset() - origin, b.storage_offset() - origin,
                                                       a.shape[0]])
        self._pool_offsets[route] = offsets

    def close(self) -> None:
        """Give the pool's memory back now (resident adapters evicted; loaded ones stay in host memory, and a later
        `generate` needs a new Generator)."""
        for route in list(self.pool.adapters):
            self.pool.evict(route)
        self.pool.buffer = self.pool.buffer.new_empty(0)
        self._closed = True

    # Generation

    def generate(self, requests: list[GenerationRequest],
                 on_step: Callable[[dict[str, list[int]], dict[str, list[TokenLogprobs]]], Collection[str]]
                 | None = None) -> list[Completion]:
        """Complete every request (same order); requests join the running batch as pages allow. `on_step` is called
        after each forward with request id -> tokens generated so far (read only) of the requests it advanced, and
        request id -> their log-probs so far (of those whose sampling asks), and returns the ids of those to end now
        (finish_reason "stop"): a streaming caller publishes their new text (and its tokens' log-probs) as they are
        generated, and ends a request whose text reached one of its stop strings."""
        if self._closed:
            raise RuntimeError("this Generator was closed (its pool given back): make a new one")
        live = self._live_adapters()
        routes = [self._check(request, live) for request in requests]
        _check_prompt_groups(requests, routes)
        waiting = deque(zip(range(len(requests)), requests, routes))
        running: list[Running] = []
        completions: list[Completion | None] = [None] * len(requests)
        with self._serving(routes, live):
            try:
                while waiting or running:
                    running += self._admit(waiting, running)
                    stepped = self._step(self._round_spans(running))
                    if on_step is not None:
                        ended = on_step({request.request.request_id: request.generated for request in stepped},
                                        {request.request.request_id: request.logprobs for request in stepped
                                         if request.request.sampling.logprobs is not None})
                        for request in stepped:
                            if request.request.request_id in ended and not request.finish_reason:
                                request.finish_reason = "stop"
                    for request in [request for request in running if request.finish_reason]:
                        completions[request.index] = request.completion()
                        self._retire(request)
                        running.remove(request)
            finally:  # a failed call (out of memory, say) leaves no page held
                for request in running:
                    self._retire(request)
        return completions

    def _check(self, request: GenerationRequest, live: dict) -> str | None:
        """Its routing key; ValueError for a request that is malformed or could never fit the pool."""
        sampling = request.sampling
        if not request.prompt_ids:
            raise ValueError(f"request {request.request_id!r}: empty prompt")
        vocabulary = self.decoder.embed_tokens.num_embeddings
        outside = next((token for token in request.prompt_ids if not 0 <= token < vocabulary), None)
        if outside is not None:  # on a GPU an embedding lookup out of range would take the whole process down
            raise ValueError(f"request {request.request_id!r}: prompt token {outside} is outside the vocabulary "
                             f"(0..{vocabulary - 1})")
        if (sampling.max_tokens < 1 or sampling.temperature < 0 or not 0 < sampling.top_p <= 1
                or (sampling.logprobs is not None and sampling.logprobs < 0)):
            raise ValueError(f"request {request.request_id!r}: sampling {sampling} (need max_tokens >= 1, "
                             "temperature >= 0, 0 < top_p <= 1, logprobs None or >= 0)")
        soft = request.soft_prompt
        if soft is not None and (soft.dim() != 2 or soft.shape[1] != self.decoder.embed_tokens.embedding_dim
                                 or not 0 < soft.shape[0] < len(request.prompt_ids)):
            raise ValueError(f"request {request.request_id!r}: soft prompt {tuple(soft.shape)} (need [m, "
                             f"{self.decoder.embed_tokens.embedding_dim}] with 0 < m < its {len(request.prompt_ids)} "
                             "prompt positions)")
        route = self._route(request.adapter, live)
        pages = self._kv_blocks(request)
        if route is not None and route.startswith(LOADED_PREFIX):
            shapes = self._host[request.adapter].shapes()
            pages += self.pool.pages_for_factors(shapes, self.pool.layout.page_elements)
        if pages > self.pool.num_pages:
            raise ValueError(f"request {request.request_id!r} can never fit: it needs {pages} pages of "
                             f"{self.pool.page_bytes} bytes (KV for {len(request.prompt_ids)} + "
                             f"{sampling.max_tokens} tokens and its adapter), the pool has {self.pool.num_pages}")
        return route

    def _kv_blocks(self, request: GenerationRequest) -> int:
        """Blocks for the longest the request can get: every token but the last generated is cached."""
        return self.pool.layout.blocks_for(len(request.prompt_ids) + request.sampling.max_tokens - 1)

    @contextmanager
    def _serving(self, routes: list[str | None], live_adapters: dict):
        """Eval mode for the live jobs' adapters, no autograd; afterwards the cohort's routing as it was."""
        live = {route: live_adapters[route] for route in routes if route in live_adapters}
        modes = {route: adapter.training for route, adapter in live.items()}
        saved = self.routing.segments, self.routing.dropout_seeds
        try:
            for adapter in live.values():
                adapter.train(False)
            self.routing.dropout_seeds = None
            with torch.no_grad():
                yield
        finally:
            for route, adapter in live.items():
                adapter.train(modes[route])
            self.routing.segments, self.routing.dropout_seeds = saved

    def _admit(self, waiting: deque, running: list[Running]) -> list[Running]:
        """Take waiting requests in order while the pool has pages for their adapter and whole KV (no preemption:
        a running request never runs out of pages) and this round's `max_prefill_tokens`, after the prompts still
        being prefilled, have tokens left for a first chunk. With nothing running the first one always fits
        (`_check`). A choice whose group has one running shares that one's full prompt blocks (`_prompt_donor`)."""
        admitted = []
        budget = self.max_prefill_tokens - sum(request.prompt_left for request in running)
        try:
            while waiting and budget > 0:
                index, request, route = waiting[0]
                donor = self._prompt_donor(request, running + admitted)
                pages = self._reserve(route, request, donor)
                if pages is None:
                    if not running and not admitted:
                        raise RuntimeError(f"request {request.request_id!r} found the pool full with nothing running")
                    break
                waiting.popleft()
                admitted.append(self._running(index, request, route, pages, donor))
                budget -= admitted[-1].prompt_left
        except BaseException:  # a copy that failed, say: what was taken for this round goes back
            for running_request in admitted:
                self._retire(running_request)
            raise
        return admitted

    def _prompt_donor(self, request: GenerationRequest, running: list[Running]) -> Running | None:
        """A running request of the request's prompt group, whose full prompt blocks it shares; None when it has
        none to share (no group, none of it running, or a prompt within one block): it prefills its own."""
        if request.prompt_group is None or not self._shared_blocks(request):
            return None
        return next((other for other in running if other.request.prompt_group == request.prompt_group), None)

    def _shared_blocks(self, request: GenerationRequest) -> int:
        """The prompt's full blocks but the one holding its last token: that token's row gives a choice its first
        logits, so each choice computes it (and the rest of its block) itself, into a block of its own."""
        return (len(request.prompt_ids) - 1) // self.pool.layout.block_tokens

    def _reserve(self, route: str | None, request: GenerationRequest, donor: Running | None) -> list[int] | None:
        """The request's adapter resident and pinned and its KV pages held: the donor's shared prompt blocks (one
        more holder each) and new pages for the rest; None (nothing held) when the pool cannot give them now."""
        shared = donor.pages[:self._shared_blocks(request)] if donor is not None else []
        loaded = route is not None and route.startswith(LOADED_PREFIX)
        try:
            if loaded:
                self._make_resident(route)
                self.pool.pin(route)
            try:
                own = self.pool.allocate_blocks(self._kv_blocks(request) - len(shared))
            except PoolFull:
                if loaded:
                    self.pool.unpin(route)
                raise
        except PoolFull:
            return None
        self.pool.share_blocks(shared)
        return shared + own

    def _running(self, index: int, request: GenerationRequest, route: str | None, pages: list[int],
                 donor: Running | None) -> Running:
        """An admitted request; one sharing a donor's blocks starts its prompt after them, once they are cached by
        the request that prefills them (the donor, or the one the donor shares from)."""
        admitted = Running(index, request, route, pages, _request_rng(request.sampling))
        if donor is not None:
            admitted.prompt_source = donor.prompt_source or donor
            admitted.shared_tokens = admitted.prefilled = self._shared_blocks(request) * self.pool.layout.block_tokens
        return admitted

    def _retire(self, request: Running) -> None:
        self.pool.free_blocks(request.pages)
        if request.route is not None and request.route.startswith(LOADED_PREFIX):
            self.pool.unpin(request.route)

    def _round_spans(self, running: list[Running]) -> list[Span]:
        """Each running request's rows this round: a decoding one's last token; a prefilling one's next chunk of its
        prompt while the round's `max_prefill_tokens` last (the earliest admitted first); none for a choice whose
        shared prompt blocks are not cached yet."""
        spans, budget = [], self.max_prefill_tokens
        for request in running:
            if not request.ready:
                continue
            start = request.cached_tokens
            if request.prompt_left == 0:
                spans.append(Span(request, start, (request.generated[-1],)))
            elif budget > 0:
                chunk = request.request.prompt_ids[start:start + budget]
                spans.append(Span(request, start, chunk))
                budget -= len(chunk)
        return spans

    def _step(self, spans: list[Span]) -> list[Running]:
        """One forward over the round's spans; the requests it advanced (a decode step, or a prompt's last chunk)
        sample their next token and are returned."""
        spans = sorted(spans, key=lambda span: _route_order(span.request))
        logits = self._forward(self._forward_rows(spans))
        for span in spans:
            span.request.prefilled = min(span.end, len(span.request.request.prompt_ids))
        advanced = [span.request for span in spans if span.samples]
        if advanced:
            self._sample(advanced, logits)
        return advanced

    def _forward_rows(self, spans: list[Span]) -> ForwardRows:
        """The spans (grouped by adapter) as one forward's rows; the last row of each span that samples gives its
        logits."""
        block = self.pool.layout.block_tokens
        ids, places, firsts = [], [], []
        for span in spans:
            firsts.append(len(ids))
            ids += span.tokens
            places += range(span.start, span.end)
        pages = [span.request.pages[p // block] for span in spans for p in range(span.start, span.end)]
        logit_rows = [first + len(span.tokens) - 1 for span, first in zip(spans, firsts) if span.samples]
        token_ids, positions, slot_pages, slot_offsets, logit_rows = self._tensors(
            ids, places, pages, [p % block for p in places], logit_rows)
        rows = ForwardRows(token_ids, positions, slot_pages, slot_offsets,
                           _segments([span.request for span in spans], [len(span.tokens) for span in spans]),
                           logit_rows, *self._attention_parts(spans, firsts))
        rows.soft_rows, rows.soft_embeddings = self._soft_rows(spans, firsts)
        return rows

    def _soft_rows(self, spans: list[Span], firsts: list[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The rows of soft-prompt positions in this forward and their embeddings (None, None: none)."""
        rows, embeddings = [], []
        for span, first in zip(spans, firsts):
            soft = span.request.request.soft_prompt
            if soft is not None and span.start < soft.shape[0]:
                end = min(span.end, soft.shape[0])
                rows += range(first, first + end - span.start)
                embeddings.append(soft[span.start:end])
        if not rows:
            return None, None
        return self._tensors(rows)[0], torch.cat(embeddings).to(self.device)

    def _attention_parts(self, spans: list[Span], firsts: list[int]):
        """ForwardRows' prompts, paged rows and chunks: which rows attend how."""
        prompt_rows, prompt_lengths, paged, paged_rows, chunks = [], [], [], [], []
        for span, first in zip(spans, firsts):
            rows = range(first, first + len(span.tokens))
            if len(rows) == 1:
                paged.append(span)
                paged_rows.append(first)
            elif span.start == 0:
                prompt_rows += rows
                prompt_lengths.append(len(rows))
            else:
                chunks += self._chunk_pieces(span, rows)
        prompts = PromptSpans(self._row_index(prompt_rows), prompt_lengths) if prompt_rows else None
        return prompts, self._paged_rows(paged, paged_rows), chunks

    def _chunk_pieces(self, span: Span, rows: range) -> list[ChunkSpan]:
        """A later chunk as pieces of at most CHUNK_ATTENTION_ROWS queries, each over the cache up to its last."""
        pieces = []
        for offset in range(0, len(rows), CHUNK_ATTENTION_ROWS):
            piece = Span(span.request, span.start + offset, span.tokens[offset:offset + CHUNK_ATTENTION_ROWS])
            table, positions = self._tensors(self._context_pages(piece), list(range(piece.start, piece.end)))
            pieces.append(ChunkSpan(slice(rows.start + offset, rows.start + offset + len(piece.tokens)), table,
                                    positions))
        return pieces

    def _paged_rows(self, spans: list[Span], rows: list[int]) -> PagedRows | None:
        if not spans:
            return None
        tables = [self._context_pages(span) for span in spans]
        widest = max(len(pages) for pages in tables)
        tables = [pages + pages[:1] * (widest - len(pages)) for pages in tables]  # padding: masked out
        tables, context_lengths = self._tensors(tables, [span.end for span in spans])
        return PagedRows(self._row_index(rows), tables, context_lengths)

    def _row_index(self, rows: list[int]) -> slice | torch.Tensor:
        """A part's rows: a slice when they are one run (as in a round of decode steps alone: no gather per layer),
        else their indices."""
        if rows[-1] - rows[0] == len(rows) - 1:
            return slice(rows[0], rows[-1] + 1)
        return self._tensors(rows)[0]

    def _context_pages(self, span: Span) -> list[int]:
        """The blocks of its request's cache up to the span's last row."""
        return span.request.pages[:(span.end - 1) // self.pool.layout.block_tokens + 1]

    def _tensors(self, *lists: list[int]) -> list[torch.Tensor]:
        return [torch.tensor(values, dtype=torch.int64, device=self.device) for values in lists]

    def _sample(self, requests: list[Running], logits: torch.Tensor) -> None:
        """Append each request's next token, or finish it on a stop/eos token or at max_tokens."""
        samplings = [request.request.sampling for request in requests]
        uniforms = [request.rng.random() if sampling.temperature > 0 else None
                    for request, sampling in zip(requests, samplings)]
        tokens = next_tokens(logits, samplings, uniforms)
        logprobs = token_logprobs(logits, samplings, tokens)
        for row, (request, token) in enumerate(zip(requests, tokens)):
            sampling = request.request.sampling
            if token in self.eos_token_ids or token in sampling.stop_token_ids:
                request.finish_reason = "stop"
                continue
            request.generated.append(token)
            if row in logprobs:
                request.logprobs.append(logprobs[row])
            if len(request.generated) >= sampling.max_tokens:
                request.finish_reason = "length"

    def _pooled_adapters(self, segments: dict[str, tuple[int, int]]) -> PooledAdapters | None:
        """The table of where the forward's loaded adapters lie, for every layer at once: one stack of their placed
        offsets and one copy to the device, instead of stacking their factors in every layer."""
        routes = [route for route in segments if route.startswith(LOADED_PREFIX)]
        if not routes:
            return None
        layers = len(self._layers)
        # an adapter placed before later loads wrapped more layers targets none of those: rank 0 there
        placed = [self._pool_offsets[route] for route in routes]
        offsets = torch.stack([row if len(row) == layers else F.pad(row, (0, 0, 0, layers - len(row)))
                               for row in placed], dim=1)
        table = pooled_lora_table(
            [segments[route] for route in routes],
            [self._host[route.removeprefix(LOADED_PREFIX)].scale for route in routes], offsets,
            [(layer.in_features, layer.out_features) for layer in self._layers.values()],
            self.pool.buffer.numel(), self.device)
        return PooledAdapters(self.pool.buffer.view(-1), table, {name: i for i, name in enumerate(self._layers)})

    def _forward(self, rows: ForwardRows) -> torch.Tensor:
        """Logits [len(logit_rows), vocab] of the rows' next tokens, their K/V written into the cache."""
        self.routing.segments = rows.segments
        # between forwards the routing holds no view of the pool: a dropped Generator's pool is freed at once
        self.routing.pooled = self._pooled_adapters(rows.segments)
        try:
            hidden = self.decoder.embed_tokens(rows.token_ids)
            if rows.soft_rows is not None:
                hidden[rows.soft_rows] = rows.soft_embeddings.to(hidden.dtype)
            cos, sin = (t[0] for t in self.decoder.rotary_emb(hidden, rows.positions[None]))
            kv = self.pool.kv_view()
            for index, layer in enumerate(self.decoder.layers):
                hidden = hidden + self._attention(layer.self_attn, layer.input_layernorm(hidden), cos, sin,
                                                  kv[:, index], rows)
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        finally:
            self.routing.segments, self.routing.pooled = {}, None
        return self.model.lm_head(self.decoder.norm(hidden[rows.logit_rows]))

    def _attention(self, attention, x, cos, sin, kv_layer, rows: ForwardRows) -> torch.Tensor:
        """Llama's attention block over the paged cache: q/k/v (every adapter's rows at once), Qwen3's q/k norms,
        rotary, K/V into the cache, attention, o_proj."""
        length, head_dim = x.shape[0], attention.head_dim
        q, k, v = shared_input_projections([attention.q_proj, attention.k_proj, attention.v_proj], x)
        q, k, v = (t.view(length, -1, head_dim) for t in (q, k, v))
        if hasattr(attention, "q_norm"):
            q, k = attention.q_norm(q), attention.k_norm(k)
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        kv_layer[rows.slot_pages, 0, rows.slot_offsets] = k
        kv_layer[rows.slot_pages, 1, rows.slot_offsets] = v
        out = attend(q, k, v, kv_layer, rows, attention.scaling, _sliding_window(attention))
        return attention.o_proj(out.reshape(length, -1))


def _sliding_window(attention) -> int | None:
    """Qwen2/Qwen3 name each layer's window on the module (None on full-attention layers); Mistral's forward reads
    its config's."""
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return getattr(attention.config, "sliding_window", None)


def _route_order(request: Running) -> str:
    """Rows of one adapter next to each other (the base alone's first)."""
    return request.route or ""


def _segments(requests: list[Running], lengths: list[int]) -> dict[str, tuple[int, int]]:
    """Routing key -> its rows, for requests sorted by route with `lengths` rows each."""
    segments, start = {}, 0
    for request, length in zip(requests, lengths):
        if request.route is not None:
            begin = segments.get(request.route, (start, start))[0]
            segments[request.route] = (begin, start + length)
        start += length
    return segments


def _check_prompt_groups(requests: list[GenerationRequest], routes: list[str | None]) -> None:
    """The requests of a prompt group share its prompt's cache: ValueError for one whose prompt or adapter differs
    from its group's first."""
    firsts: dict[str, tuple[GenerationRequest, str | None]] = {}
    for request, route in zip(requests, routes):
        if request.prompt_group is None:
            continue
        first, first_route = firsts.setdefault(request.prompt_group, (request, route))
        if request.prompt_ids != first.prompt_ids or route != first_route:
            what = "prompt" if request.prompt_ids != first.prompt_ids else "adapter"
            raise ValueError(f"request {request.request_id!r} is in prompt group {request.prompt_group!r} with "
                             f"{first.request_id!r} but its {what} differs: a group shares one prompt's cache")


def _request_rng(sampling: Sampling) -> random.Random:
    """The request's own stream on the host (seeded: the same tokens whatever it is batched with). Unseeded ones
    draw their seed from the OS, never from torch's global generator (training's)."""
    return random.Random(sampling.seed if sampling.seed is not None else secrets.randbits(63))
