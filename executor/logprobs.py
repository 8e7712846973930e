"""A choice's per-token log-probs as text (executor/serving.py): the engine gives token ids and log-probs
(`generate.TokenLogprobs`); the caller sees each token's text, its UTF-8 bytes, and where it starts in the choice's
text (`scheduler.generation.TokenLogprob`), in OpenAI's terms.

A token's text is its own bytes (byte-level BPE's, SentencePiece's with its word-start space), decoded; a token that is
part of a character (a byte-level BPE byte of a multi-byte character) is written `bytes:\\xe6\\x97` as OpenAI writes
it, its `bytes` the exact ones. Its offset counts the characters of the text whose bytes all come before its own.
The offsets are found token by token (`TokenSpans`): a streamed choice's tokens go out with the text that makes
them whole (executor/streaming.py), at the offsets the whole choice's give them.
"""

from __future__ import annotations

import bisect
import codecs
import functools
import re
from typing import Optional

from lorafleet.executor.generate import TokenLogprobs
from lorafleet.scheduler.generation import TokenLogprob, TopLogprob

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback
_WORD_START = "\u2581"  # SentencePiece's space


@functools.cache
def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): each byte is written as one printable character; this is its inverse."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:  # the others are moved past 255, in order
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The UTF-8 bytes a token stands for (none for a special token: the text leaves those out)."""
    if token_id in tokenizer.all_special_ids:
        return b""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if (byte := _BYTE_TOKEN.fullmatch(piece)) is not None:
        return bytes([int(byte.group(1), 16)])
    byte_of = _byte_of_char()
    if all(char in byte_of for char in piece):
        # byte-level BPE writes bytes as characters; plain ASCII pieces read the same either way. The decode tells
        # a SentencePiece piece of non-ASCII characters (whose characters are themselves) from byte-level bytes.
        raw = bytes(byte_of[char] for char in piece)
        if raw.decode("utf-8", "replace") == tokenizer.decode([token_id]):
            return raw
    return piece.replace(_WORD_START, " ").encode("utf-8")


def token_text(tokenizer, token_id: int) -> tuple[str, bytes]:
    """A token's text as OpenAI shows it, and its bytes."""
    raw = token_bytes(tokenizer, token_id)
    if not raw and token_id in tokenizer.all_special_ids:
        return tokenizer.convert_ids_to_tokens(token_id), raw
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:  # part of a character
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw), raw


class TokenSpans:
    """Where each token's text lies in the text of all the tokens so far, in characters, the tokens given one at a
    time: a streamed choice's as they are generated (executor/streaming.py), a whole choice's at once
    (`choice_logprobs`), the same offsets either way.

    A token's text starts after the characters (as a lossy UTF-8 decode reads the tokens' bytes, U+FFFD for bytes
    that never complete one) whose bytes all come before its own, and ends with the character that holds its last
    byte: it is whole once that character is. SentencePiece's decode drops the first word's space, which makes the
    text that many characters shorter than the bytes' decode (`dropped`): known from the first tokens that end on a
    whole character (else, for a text that never does, once the tokens are all given, `finish`)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._char_ends: list[int] = []  # the byte where each character ends
        self._starts: list[int] = []  # each token's first byte
        self._ends: list[int] = []  # the byte after each token's last
        self.dropped: Optional[int] = None

    def __len__(self) -> int:
        return len(self.token_ids)

    def add(self, token_id: int) -> None:
        position = self._ends[-1] if self._ends else 0
        self._starts.append(position)
        for byte in token_bytes(self.tokenizer, token_id):
            out = self._decoder.decode(bytes([byte]))
            if out:  # a byte that shows an earlier one was no character's start ends that one's U+FFFD before it
                self._char_ends += [position] * (len(out) - 1) + [position + 1]
            position += 1
        self._ends.append(position)
        self.token_ids.append(token_id)
        if self.dropped is None and self._char_ends and not self._decoder.getstate()[0]:
            self.dropped = self._dropped_chars()

    def finish(self) -> None:
        """All the tokens were given: bytes that end the text without completing a character count as one U+FFFD."""
        end = self._ends[-1] if self._ends else 0
        self._char_ends += [end] * len(self._decoder.decode(b"", final=True))
        if self.dropped is None:
            self.dropped = self._dropped_chars()

    def _dropped_chars(self) -> int:
        decoded = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        return max(0, len(self._char_ends) - len(decoded))

    def start(self, index: int) -> int:
        """Where token `index`'s text starts (once `dropped` is known)."""
        return max(0, bisect.bisect_right(self._char_ends, self._starts[index]) - self.dropped)

    def whole_within(self, shown: int, since: int = 0) -> int:
        """How many tokens, from the first, have their text within the text's first `shown` characters, counting on
        from `since` (tokens known to be): each whole, ending by `shown` and starting before it (a token without
        text, such as a special one, goes with the text after it)."""
        count = since
        while count < len(self) and self.dropped is not None and self.start(count) < shown:
            end = self._ends[count]
            if end > self._starts[count]:
                if not self._char_ends or self._char_ends[-1] < end:  # its last character is not whole yet
                    break
                if bisect.bisect_left(self._char_ends, end) + 1 - self.dropped > shown:
                    break
            count += 1
        return count


def token_entry(tokenizer, token_id: int, found: TokenLogprobs, offset: int) -> TokenLogprob:
    """A generated token's entry: its text, log-prob and bytes, where it starts, and the likeliest tokens there."""
    alternatives = []
    for alternative, value in zip(found.top_ids, found.top_logprobs):
        text, raw = token_text(tokenizer, alternative)
        alternatives.append(TopLogprob(token=text, logprob=value, bytes=tuple(raw)))
    text, raw = token_text(tokenizer, token_id)
    return TokenLogprob(token=text, logprob=found.logprob, bytes=tuple(raw), text_offset=offset,
                        top_logprobs=tuple(alternatives))


def choice_logprobs(tokenizer, token_ids: tuple[int, ...], logprobs: tuple[TokenLogprobs, ...],
                    cut_at: Optional[int]) -> tuple[TokenLogprob, ...]:
    """Each generated token's entry; with `cut_at` (the text was cut there, before a stop string) only the tokens
    whose text starts before the cut."""
    spans = TokenSpans(tokenizer)
    for token_id in token_ids:
        spans.add(token_id)
    spans.finish()
    entries = []
    for index, (token_id, found) in enumerate(zip(token_ids, logprobs)):
        offset = spans.start(index)
        if cut_at is not None and offset >= cut_at:
            break
        entries.append(token_entry(tokenizer, token_id, found, offset))
    return tuple(entries)
