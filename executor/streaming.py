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

Log-probs (a request with `Sampling.logprobs`): each text event carries the entries of the tokens whose text it
makes whole, as OpenAI streams them: a token goes with the event that sends the last character of its text, so the
tokens held back with their text (part of a character, a possible start of a stop string) go with a later one
(`StreamedLogprobs`). The entries are the non-streamed answer's (executor/logprobs.py), their `text_offset` where the
token starts in the choice's whole text (as OpenAI's); the last events carry the rest of the answer's, which is cut
at a stop string with its text. Joined over the events, text and log-probs are thus the answer's.
"""

from __future__ import annotations

import logging

from lorafleet.executor.generate import TokenLogprobs
from lorafleet.executor.logprobs import TokenSpans, token_entry
from lorafleet.scheduler.generation import (
    GenerationRequest, GenerationResult, Generations, StreamedText, TokenLogprob,
)

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


class StreamedLogprobs:
    """One streamed choice's tokens' log-prob entries, each sent with the text that makes the token whole."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.spans = TokenSpans(tokenizer)
        self.sent: list[TokenLogprob] = []

    def add(self, tokens: list[int], logprobs: list[TokenLogprobs], shown: int) -> tuple[TokenLogprob, ...]:
        """The entries not sent before of the tokens whose text lies within the first `shown` characters of the
        choice's text (what was sent of it), given every token generated so far and their log-probs."""
        for token_id in tokens[len(self.spans):]:
            self.spans.add(token_id)
        whole = self.spans.whole_within(shown, since=len(self.sent))
        new = tuple(token_entry(self.tokenizer, tokens[index], logprobs[index], self.spans.start(index))
                    for index in range(len(self.sent), whole))
        self.sent += new
        return new

    def unsent(self, choice_id: str, final: tuple[TokenLogprob, ...]) -> tuple[TokenLogprob, ...]:
        """The answer's entries (`final`) not sent: those after the ones sent, which are its first."""
        if final[:len(self.sent)] != tuple(self.sent):  # cannot be: both are `TokenSpans`' offsets of the same tokens
            log.warning("request %s: streamed log-probs are not the start of its log-probs", choice_id)
        return final[len(self.sent):]


class StreamPublisher:
    """The `on_step` of the `Generator.generate` calls of one batch: publishes the new text of its streamed
    requests' choices (each choice is an engine request of its own: `GenerationRequest.choice_ids`), ends the choices
    (streamed or not) whose text reached a stop string, and delivers the answers (a stream's last events with the
    text, and the log-probs, not sent yet)."""

    def __init__(self, generations: Generations, tokenizer, requests: list[GenerationRequest]):
        self.generations, self.tokenizer = generations, tokenizer
        self.choices: dict[str, tuple[GenerationRequest, int]] = {}  # engine request id -> (its request, its index)
        self.texts: dict[str, IncrementalText] = {}
        self.logprobs: dict[str, StreamedLogprobs] = {}  # of the streamed choices that ask
        for request in requests:
            if request.stream or request.sampling.stop:
                for index, choice_id in enumerate(request.choice_ids()):
                    self.choices[choice_id] = request, index
                    self._start(request, choice_id)

    def _start(self, request: GenerationRequest, choice_id: str) -> None:
        self.texts[choice_id] = IncrementalText(self.tokenizer, request.sampling.stop)
        if request.stream and request.sampling.logprobs is not None:
            self.logprobs[choice_id] = StreamedLogprobs(self.tokenizer)

    def __call__(self, generated: dict[str, list[int]], logprobs: dict[str, list[TokenLogprobs]]) -> set[str]:
        """Publish the streamed choices' new text (and its tokens' log-probs); the engine ids of the choices to end
        (a stop string reached)."""
        new_texts, ended = [], set()
        for choice_id, tokens in generated.items():
            if choice_id not in self.texts:
                continue
            text, (request, index) = self.texts[choice_id], self.choices[choice_id]
            new = text.add(tokens)
            entries = None
            if choice_id in self.logprobs:
                entries = self.logprobs[choice_id].add(tokens, logprobs[choice_id], text.sent)
            if (new or entries) and request.stream:
                new_texts.append(StreamedText(request, index, new, entries))
            if text.stopped:
                ended.add(choice_id)
        if new_texts:
            self.generations.publish_text(new_texts)
        return ended

    def may_run_again(self, request: GenerationRequest) -> bool:
        """Whether a request whose batch failed may run again: not a streamed one some of whose text was sent (a
        second run may draw other tokens); its choices' texts start afresh."""
        choice_ids = [choice_id for choice_id in request.choice_ids() if choice_id in self.texts]
        if request.stream and any(self.texts[choice_id].sent or self._logprobs_sent(choice_id)
                                  for choice_id in choice_ids):
            return False
        for choice_id in choice_ids:
            self._start(request, choice_id)
        return True

    def _logprobs_sent(self, choice_id: str) -> bool:
        return choice_id in self.logprobs and bool(self.logprobs[choice_id].sent)

    def deliver(self, request: GenerationRequest, result: GenerationResult) -> None:
        """The request's answer (`Generations.deliver`): a streamed one's last events carry each choice's text not
        sent, and its log-probs not sent."""
        unsent, unsent_logprobs = [], []
        for choice, choice_id in zip(result.choices, request.choice_ids()):
            streamed = self.texts.get(choice_id) if request.stream else None
            sent = streamed.text[:streamed.sent] if streamed else ""
            if not choice.text.startswith(sent):  # the windowed decode disagreed with the whole
                log.warning("request %s: streamed text %r is not the start of its text %r", choice_id, sent,
                            choice.text)
            unsent.append(choice.text[len(sent):])
            streamed_logprobs = self.logprobs.get(choice_id)
            unsent_logprobs.append(streamed_logprobs.unsent(choice_id, choice.logprobs)
                                   if streamed_logprobs and choice.logprobs is not None else None)
        self.generations.deliver(request, result, unsent, unsent_logprobs)
