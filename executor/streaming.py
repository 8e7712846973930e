"""A streamed generation request's text as it is generated (executor/serving.py): after each forward the requests'
new tokens become text that never splits a character and never shows part of a stop string, published to each
request's stream (`Generations.publish_text`) in one round trip. A request whose text reached one of its stop strings
(streamed or not) ends there: nothing after it would be shown, and its caller need not wait for max_tokens.

Incremental detokenization: a token's text depends on its neighbours (a byte-level BPE token may be one byte of a
multi-byte character; SentencePiece drops the leading space of a decode's first word). So each step decodes a short
window twice, the tokens already shown (from `prefix` to `read`) and those with the new ones, and the new text is the
difference; it waits while it ends in U+FFFD, an unfinished character the next token completes.

Stop strings: the final text is cut before the first stop string it holds (`serving.cut_at_stop`). A stop string in
the text, or a tail of the text that a stop string begins with (the next tokens may complete it), is held back. What
was sent is thus always the start of the final text; the stream's last event carries the rest (`unsent`).
"""

from __future__ import annotations

import logging

from lorafleet.scheduler.generation import GenerationRequest, GenerationResult, Generations

log = logging.getLogger("lorafleet.executor.streaming")

INCOMPLETE = "\ufffd"  # what a decode shows for bytes that do not finish a character


def begun_length(text: str, stop: str) -> int:
    """The length of the longest tail of `text` that `stop` begins with, shorter than `stop` (0: none)."""
    for length in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:length]):
            return length
    return 0


class IncrementalText:
    """One request's text, decoded as its tokens come, and how much of it may be shown."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.text = ""  # decoded so far
        self.sent = 0  # characters of `text` shown
        self.stopped = False  # the text reached a stop string, and none begins before it: the request may end
        self._prefix = self._read = 0  # token offsets: the window's start, the end of the tokens decoded

    def add(self, tokens: list[int]) -> str:
        """The text that may be shown now and was not before, given every token generated so far."""
        if self.stopped:
            return ""
        self.text += self._new_text(tokens)
        end = self._shown_end()
        new, self.sent = self.text[self.sent:end], max(self.sent, end)
        return new

    def _new_text(self, tokens: list[int]) -> str:
        if len(tokens) == self._read:
            return ""
        shown = self._decode(tokens[self._prefix:self._read])
        both = self._decode(tokens[self._prefix:])
        if len(both) <= len(shown) or both.endswith(INCOMPLETE):
            return ""
        self._prefix, self._read = self._read, len(tokens)
        return both[len(shown):]

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)  # as `GenerationServer._result` decodes

    def _shown_end(self) -> int:
        """Where the text that may be shown ends: before the first stop string, or before a tail that one begins
        with. Nothing before `sent` starts one (it would have been held back), so the search starts there."""
        end, first_stop = len(self.text), None
        for stop in self.stops:
            found = self.text.find(stop, self.sent)
            if found >= 0:
                first_stop = found if first_stop is None else min(first_stop, found)
                end = min(end, found)
            else:
                end = min(end, len(self.text) - begun_length(self.text, stop))
        # ended only when no other stop string may yet begin before this one: the cut is then final
        self.stopped = first_stop is not None and first_stop == end
        return end


class StreamPublisher:
    """The `on_step` of the `Generator.generate` calls of one batch: publishes the new text of its streamed
    requests, ends the requests (streamed or not) whose text reached a stop string, and delivers the answers (a
    stream's last event with the text not sent yet)."""

    def __init__(self, generations: Generations, tokenizer, requests: list[GenerationRequest]):
        self.generations, self.tokenizer = generations, tokenizer
        self.requests = {request.request_id: request for request in requests
                         if request.stream or request.sampling.stop}
        self.texts = {request_id: IncrementalText(tokenizer, request.sampling.stop)
                      for request_id, request in self.requests.items()}

    def __call__(self, generated: dict[str, list[int]]) -> set[str]:
        """Publish the streamed requests' new text; the ids of the requests to end (a stop string reached)."""
        new_texts, ended = [], set()
        for request_id, tokens in generated.items():
            if request_id not in self.texts:
                continue
            text, request = self.texts[request_id], self.requests[request_id]
            new = text.add(tokens)
            if new and request.stream:
                new_texts.append((request, new))
            if text.stopped:
                ended.add(request_id)
        if new_texts:
            self.generations.publish_text(new_texts)
        return ended

    def may_run_again(self, request_id: str) -> bool:
        """Whether a request whose batch failed may run again: not a streamed one some of whose text was sent (a
        second run may draw other tokens); its text starts afresh."""
        if request_id in self.texts:
            request = self.requests[request_id]
            if request.stream and self.texts[request_id].sent:
                return False
            self.texts[request_id] = IncrementalText(self.tokenizer, request.sampling.stop)
        return True

    def deliver(self, request: GenerationRequest, result: GenerationResult) -> None:
        """The request's answer (`Generations.deliver`): a streamed one's last event carries the text not sent."""
        streamed = self.texts.get(request.request_id) if request.stream else None
        sent = streamed.text[:streamed.sent] if streamed else ""
        if result.error is None and not result.text.startswith(sent):  # the windowed decode disagreed with the whole
            log.warning("request %s: streamed text %r is not the start of its text %r", request.request_id, sent,
                        result.text)
        self.generations.deliver(request, result, result.text[len(sent):])
