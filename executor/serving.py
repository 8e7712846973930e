"""The executor's side of generation through the service: between training steps (and while idle) it answers the
waiting requests for the base it has loaded (`scheduler/generation.py`), many adapters in one batch
(`executor/generate.py`'s `Generator` on the cohort's own model, so serving costs no second copy of the base).

Each gap takes a bounded amount of work (`ServingBudget`): `Generator.generate` runs until the batch's longest
request is done, so the budget bounds how long training waits. Between steps: at most 16 requests whose max_tokens
add up to 2048; a batch then costs about max(max_tokens) decode steps of at most 16 rows (a 256-token chat answer on
an 8B base: a few seconds), and requests are taken oldest first, so none starves behind training. Idle (no job
training): 64 requests and 16384 tokens a batch.

Adapters are fetched from the artifact store (`ArtifactStore.fetch`: a local path as it is, a remote one copied under
the executor's scratch directory) and kept loaded, the least recently used unloaded past `MAX_LOADED_ADAPTERS`. A
whole model (a GaLore job's: `ServedBase.model_uri`) is fetched the same way and loaded as the base (`weights_of`); a
LoPA job's export is kept as its prompt generator, and each request's soft prompt, computed from its prompt's input
embeddings (`lopa.soft_prompt`), goes before the prompt (`GenerationRequest.soft_prompt`).

A bad request fails alone, with the reason in its result: an adapter that does not load, a prompt that with its
max_tokens does not fit the base's context, a chat the template rejects; a batch that fails as a whole is run again
one request at a time so that only the requests at fault fail.

A streamed request's text is published as it is generated (executor/streaming.py); if its batch fails after some of
it was sent, it fails too rather than run again.

A request of `n` choices runs as `n` engine requests in the batch (`GenerationRequest.choice_ids`; with a seed, choice
i draws from `choice_seed(seed, i)`), one prompt group (its prompt's cache shared, prefilled once), answered together
as one result; log-probs asked for come from the engine's sampling step as token ids and become text, bytes and
offsets in executor/logprobs.py.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch

from lorafleet.executor.generate import GenerationRequest as EngineRequest
from lorafleet.executor.generate import Completion, Generator, Sampling
from lorafleet.executor.logprobs import choice_logprobs
from lorafleet.executor.lopa import LOPA_CONFIG, LopaPrompt, load_lopa, soft_prompt
from lorafleet.executor.streaming import StreamPublisher
from lorafleet.scheduler.artifacts import ArtifactStore
from lorafleet.scheduler.formats import FALLBACK_CHAT_HEADERS
from lorafleet.scheduler.generation import (
    ChoiceResult, GenerationRequest, GenerationResult, Generations, ServedBase, ServingBudget,
)
from lorafleet.scheduler.memory import GENERATION_POOL_TOKENS, ModelShape, generation_pool_bytes
from lorafleet.scheduler.metrics import ExecutorMetrics

log = logging.getLogger("lorafleet.executor.serving")

BETWEEN_STEPS = ServingBudget(max_requests=16, max_tokens=2048)
# The engine's page pool (KV cache and resident adapters) is allocated once per loaded base and stays, sized by the
# memory model (`pool_bytes`), which the scheduler's plan reserves beside the cohort: the KV of an idle batch (its
# max_tokens generated plus as many prompt tokens) and a quarter more for adapters, rather than the engine's default
# share of free GPU memory, which training needs (the heartbeat reports the pool's bytes).
IDLE = ServingBudget(max_requests=64, max_tokens=GENERATION_POOL_TOKENS // 2)
MAX_LOADED_ADAPTERS = 64
SWITCH_GRACE_SECONDS = 2.0  # an idle executor with a base loaded leaves an unserved base this long to one with none
SWITCH_AFTER_SECONDS = 20.0  # an idle executor busy with its base's requests leaves them for others' waiting this long


class RequestError(ValueError):
    """A request that cannot be served; the message is its result's error."""


def context_length(config) -> Optional[int]:
    """The longest sequence the base takes (Llama's and most families' name, GPT-2's), None when it does not say."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def pool_bytes(model) -> int:
    """Bytes of the serving pool for this base: the memory model's `generation_pool_bytes`, the bytes the scheduler
    reserved for it beside the cohort (`JobSize.pool_bytes`), its KV in the dtype the base computes in."""
    dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    return generation_pool_bytes(ModelShape.from_config(model.config.to_dict()), dtype)


def eos_token_ids(tokenizer, model) -> tuple[int, ...]:
    """The tokens that end a completion: the tokenizer's EOS and the model's generation config's (Llama 3 has two)."""
    found = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found += configured if isinstance(configured, (list, tuple)) else [configured]
    return tuple(dict.fromkeys(token for token in found if token is not None))


def prompt_ids(tokenizer, request: GenerationRequest) -> list[int]:
    """A completion's prompt as the tokenizer reads text (its BOS added as it adds it); a chat as the training formats
    render one (`scheduler/formats.py`): the chat template with the generation prompt, else the plain fallback."""
    if request.prompt is not None:
        return tokenizer(request.prompt)["input_ids"]
    messages = [message.model_dump() for message in request.messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja templates raise whatever their authors chose
            raise RequestError(f"messages: the base's chat template rejects this conversation: {exc}") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "".join(FALLBACK_CHAT_HEADERS[m["role"]] + m["content"] + "\n\n" for m in messages)
    return tokenizer(text + FALLBACK_CHAT_HEADERS["assistant"])["input_ids"]


def choice_seed(seed: Optional[int], index: int) -> Optional[int]:
    """The seed choice `index` of a request draws with: the request's own for the first (one choice, or the first of
    n, gives the tokens a request of n=1 gives), a hash of it and the index for the others (no two requests' seeds
    give one choice's: seed+1 would repeat another request's first choice); None stays None (the OS's)."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # below 2**63, as a request's seed


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the first stop string it contains, and whether one was found."""
    cuts = [found for stop in stops if (found := text.find(stop)) >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


class GenerationServer:
    """Answers generation requests on one executor; `serve` is called by its loop (`Executor.serve_generation`)."""

    def __init__(self, generations: Generations, executor_id: str, artifacts: ArtifactStore, scratch: Path,
                 metrics: Optional[ExecutorMetrics] = None):
        self.generations, self.executor_id, self.artifacts = generations, executor_id, artifacts
        self.metrics = metrics
        self.scratch = scratch / "adapters"
        self.cohort = None  # the cohort the generator runs on: a new one (another base) starts afresh
        self.generator = None
        self.adapters: OrderedDict[str, Path] = OrderedDict()  # adapter URI -> its local directory, LRU last
        self.model_copy: Optional[Path] = None  # a whole model fetched to serve as the base (`weights_of`)
        self.soft_prompts: OrderedDict[str, tuple[Path, LopaPrompt]] = OrderedDict()  # LoPA exports, LRU last

    def base_to_load(self, loaded: Optional[str]) -> Optional[ServedBase]:
        """For an executor without jobs: the base of the longest-waiting requests that no executor serves, claimed
        for this one (None: nothing to load). One with a base loaded leaves new requests to executors with none for
        `SWITCH_GRACE_SECONDS`; while requests for its own base wait, it switches only for requests that have waited
        `SWITCH_AFTER_SECONDS`: a base is not reloaded back and forth for every batch."""
        if loaded is None:
            patience = 0.0
        else:
            patience = SWITCH_AFTER_SECONDS if self.generations.waiting(loaded) else SWITCH_GRACE_SECONDS
        for waiting_since, base in self.generations.bases_unserved():
            if base.compat_key == loaded:
                return None
            if time.time() - waiting_since < patience:  # the oldest first: none of the others waited longer
                return None
            if self.generations.claim_base(base.compat_key, self.executor_id):
                return base
        return None

    def fail_base(self, base: ServedBase, error: str) -> None:
        """Answer a batch of the base's waiting requests with why it cannot be served here."""
        for request in self.generations.take_requests(base.compat_key, IDLE):
            self.generations.deliver(request, self._failed(request, error))

    def serve(self, cohort, compat_key: str, training: bool) -> int:
        """Answer the waiting requests for the loaded base, at most one budget's worth; how many were answered."""
        requests = self.generations.take_requests(compat_key, BETWEEN_STEPS if training else IDLE,
                                                  server=self.executor_id)
        if not requests:
            return 0
        started = time.perf_counter()
        streams = StreamPublisher(self.generations, cohort.tokenizer, requests)
        try:
            results = self._answers(cohort, requests, streams)
        except Exception as exc:  # a fault of this executor's, not of one request: they all learn it, training goes on
            log.exception("generation failed on this executor")
            results = {request.request_id: self._failed(request, f"generation failed on executor "
                                                                  f"{self.executor_id}: {exc}") for request in requests}
        self._account(requests, results, time.perf_counter() - started)  # first: an answered caller sees it counted
        for request in requests:
            streams.deliver(request, results[request.request_id])
        return len(requests)

    def _account(self, requests: list[GenerationRequest], results: dict[str, GenerationResult], seconds: float
                 ) -> None:
        """The batch's device time charged to its tenants by the tokens each one's requests computed (fair share
        counts generation as it counts training), and the executor's metrics."""
        tokens_by_tenant: dict[str, int] = {}
        for request in requests:
            result = results[request.request_id]
            computed = result.prompt_tokens + result.completion_tokens  # its choices share their prompt's prefill
            tokens_by_tenant[request.tenant] = tokens_by_tenant.get(request.tenant, 0) + computed
        total = sum(tokens_by_tenant.values())
        if total:
            self.generations.store.add_gpu_seconds(
                {tenant: seconds * tokens / total for tenant, tokens in tokens_by_tenant.items()})
        if self.metrics:
            failed = sum(1 for result in results.values() if result.error is not None)
            self.metrics.record_generation(seconds, len(requests) - failed, failed,
                                           sum(result.completion_tokens for result in results.values()))

    def _answers(self, cohort, requests: list[GenerationRequest], streams: StreamPublisher
                 ) -> dict[str, GenerationResult]:
        generator = self.generator_for(cohort)
        ready, results = [], {}
        for request in requests:
            try:
                ready.append(self._prepare(generator, cohort, request))
            except RequestError as exc:
                results[request.request_id] = self._failed(request, str(exc))
        results.update(self._generate(generator, cohort.tokenizer, ready, streams))
        self._unload_least_used(generator)
        return results

    def pool_allocated_bytes(self) -> int:
        """Bytes of the generator's page pool now allocated (0 before its first use): what the heartbeat reports."""
        generator = self.generator
        if generator is None:
            return 0
        usage = generator.pool_usage()
        return usage.page_bytes * usage.total_pages

    def weights_of(self, base: ServedBase) -> str:
        """Where to load the base to serve from: its snapshot, or a whole model's artifact (a GaLore job's), fetched
        (a remote one is copied, and removed with `release`)."""
        if base.model_uri is None:
            return base.base_snapshot
        local = self.artifacts.fetch(base.model_uri, self.scratch)
        self.model_copy = local
        return str(local)

    def release(self) -> None:
        """Drop the generator, its pool and its adapters: the executor unloads the base, whose memory they hold."""
        prompts = [local for local, _ in self.soft_prompts.values()]
        for local in [*self.adapters.values(), *prompts, *([self.model_copy] if self.model_copy else [])]:
            self._remove_copy(local)
        self.cohort, self.generator, self.adapters, self.model_copy = None, None, OrderedDict(), None
        self.soft_prompts = OrderedDict()

    def _remove_copy(self, local: Path) -> None:
        if self.scratch in local.parents:  # a copy of a remote artifact (scratch/<fetch dir>/<name>): ours to remove
            shutil.rmtree(local.parent if local.parent.parent == self.scratch else local, ignore_errors=True)

    def generator_for(self, cohort) -> Generator:
        """The cohort's one Generator (made at first use; a new cohort gets a new one): serving and the jobs'
        eval samples (executor/eval_samples.py) share it, and its pool."""
        if cohort is not self.cohort:  # made before it is kept: a base the engine refuses is refused again next time
            generator = Generator(cohort.model, cohort.routing, pool_bytes=pool_bytes(cohort.model),
                                  eos_token_ids=eos_token_ids(cohort.tokenizer, cohort.model))
            self.cohort, self.adapters, self.generator = cohort, OrderedDict(), generator
        return self.generator

    def _prepare(self, generator: Generator, cohort, request: GenerationRequest
                 ) -> tuple[GenerationRequest, list[EngineRequest]]:
        """The engine's requests, one per choice: the prompt's tokens, checked against the base's context, and its
        adapter loaded."""
        ids = prompt_ids(cohort.tokenizer, request)
        sampling = request.sampling
        adapter, lopa = self._model_of(generator, request.target.adapter_uri) if request.target.adapter_uri else (
            None, None)
        soft = None if lopa is None else self._soft_prompt(cohort, lopa, ids)
        virtual = 0 if soft is None else soft.shape[0]
        limit = context_length(cohort.model.config)
        if limit is not None and virtual + len(ids) + sampling.max_tokens > limit:
            after = f" after {virtual} soft-prompt positions" if virtual else ""
            raise RequestError(f"the prompt is {len(ids)} tokens{after}; with max_tokens {sampling.max_tokens} that is "
                               f"more than the base's context of {limit} tokens")
        return request, [EngineRequest(choice_id, (0,) * virtual + tuple(ids), adapter, Sampling(
            max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            seed=choice_seed(sampling.seed, index), logprobs=sampling.logprobs), prompt_group=request.request_id,
            soft_prompt=soft) for index, choice_id in enumerate(request.choice_ids())]

    def _model_of(self, generator, uri: str) -> tuple[Optional[str], Optional[LopaPrompt]]:
        """(the adapter's key in the generator (its URI), None), or (None, the prompt generator) of a LoPA job's
        export; fetched and loaded on first use."""
        if uri in self.adapters:
            self.adapters.move_to_end(uri)
            return uri, None
        if uri in self.soft_prompts:
            self.soft_prompts.move_to_end(uri)
            return None, self.soft_prompts[uri][1]
        try:
            local = self.artifacts.fetch(uri, self.scratch)
            if (local / LOPA_CONFIG).is_file():
                self.soft_prompts[uri] = local, load_lopa(local, generator.device)
            else:
                generator.load_adapter(uri, local)
                self.adapters[uri] = local
        except Exception as exc:  # missing files, another base's shapes, an adapter kind the engine lacks
            log.warning("adapter %s does not load: %s", uri, exc)
            raise RequestError(f"the model's adapter could not be loaded: {exc}") from None
        return self._model_of(generator, uri)

    def _soft_prompt(self, cohort, lopa: LopaPrompt, ids: list[int]) -> torch.Tensor:
        """A LoPA model's soft prompt for this prompt, computed once from its input embeddings."""
        embedding = cohort.model.get_input_embeddings()
        with torch.no_grad():
            embeds = embedding(torch.tensor(ids, device=embedding.weight.device))
        return soft_prompt(lopa, embeds)

    def _unload_least_used(self, generator) -> None:
        while len(self.adapters) > MAX_LOADED_ADAPTERS:
            uri, local = self.adapters.popitem(last=False)
            generator.unload_adapter(uri)
            self._remove_copy(local)
        while len(self.soft_prompts) > MAX_LOADED_ADAPTERS:
            self._remove_copy(self.soft_prompts.popitem(last=False)[1][0])

    def _generate(self, generator, tokenizer, ready: list, streams: StreamPublisher) -> dict[str, GenerationResult]:
        """Results of the prepared requests, in one batch; if the batch fails, one request at a time, so that a
        request the engine refuses fails alone (a streamed one whose text was partly sent fails with the batch)."""
        if not ready:
            return {}
        try:
            completions = generator.generate([engine for _, engines in ready for engine in engines], on_step=streams)
        except Exception as exc:
            if len(ready) == 1:
                log.warning("generation failed for %s: %s", ready[0][0].request_id, exc)
                return {ready[0][0].request_id: self._failed(ready[0][0], f"generation failed: {exc}")}
            results = {}
            for request, engines in ready:
                if streams.may_run_again(request):
                    results.update(self._generate(generator, tokenizer, [(request, engines)], streams))
                else:
                    results[request.request_id] = self._failed(request, f"generation failed: {exc}")
            return results
        by_id = {completion.request_id: completion for completion in completions}
        return {request.request_id: self._result(tokenizer, request, engines,
                                                 [by_id[engine.request_id] for engine in engines])
                for request, engines in ready}

    def _result(self, tokenizer, request: GenerationRequest, engines: list[EngineRequest],
                completions: list[Completion]) -> GenerationResult:
        """The answer of a request's choices (its engine requests' completions, by index); its prompt's tokens
        without a soft prompt's positions."""
        choices = tuple(self._choice(tokenizer, request, index, completion)
                        for index, completion in enumerate(completions))
        soft = engines[0].soft_prompt
        prompt_tokens = completions[0].prompt_tokens - (0 if soft is None else soft.shape[0])
        return GenerationResult(request_id=request.request_id, prompt_tokens=prompt_tokens, choices=choices,
                                executor_id=self.executor_id)

    @staticmethod
    def _choice(tokenizer, request: GenerationRequest, index: int, completion: Completion) -> ChoiceResult:
        """A choice's text, cut before a stop string, with its tokens' log-probs when asked (cut with it)."""
        whole = tokenizer.decode(list(completion.token_ids), skip_special_tokens=True)
        text, stopped = cut_at_stop(whole, request.sampling.stop)
        logprobs = None
        if completion.logprobs is not None:
            logprobs = choice_logprobs(tokenizer, completion.token_ids, completion.logprobs,
                                       len(text) if stopped else None)
        return ChoiceResult(index=index, text=text, completion_tokens=len(completion.token_ids),
                            finish_reason="stop" if stopped else completion.finish_reason, logprobs=logprobs)

    def _failed(self, request: GenerationRequest, error: str) -> GenerationResult:
        return GenerationResult(request_id=request.request_id, error=error, executor_id=self.executor_id)
