"""A choice's per-token log-probs as text (executor/serving.py): the engine gives token ids and log-probs
(`generate.TokenLogprobs`); the caller sees each token's text, its UTF-8 bytes, and where it starts in the choice's
text (`scheduler.generation.TokenLogprob`), in OpenAI's terms.

A token's text is its own bytes (byte-level BPE's, SentencePiece's with its word-start space), decoded; a token that is
part of a character (a byte-level BPE byte of a multi-byte character) is written `bytes:\\xe6\\x97` as OpenAI writes
it, its `bytes` the exact ones. Its offset counts the characters of the text whose bytes all come before its own.
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


def _char_offsets(tokenizer, token_ids: tuple[int, ...]) -> list[int]:
    """Where each token's text starts in the text of all of them: the characters (as a lossy UTF-8 decode reads
    the tokens' bytes, U+FFFD for bytes that never complete one) whose bytes all come before the token's."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    char_ends, position, starts = [], 0, []  # the byte where each character ends; each token's first byte
    for token_id in token_ids:
        starts.append(position)
        for byte in token_bytes(tokenizer, token_id):
            out = decoder.decode(bytes([byte]))
            if out:  # a byte that shows an earlier one was no character's start ends that one's U+FFFD before it
                char_ends += [position] * (len(out) - 1) + [position + 1]
            position += 1
    char_ends += [position] * len(decoder.decode(b"", final=True))
    # SentencePiece's decode drops the first word's space: the text is that much shorter than the bytes' decode
    dropped = len(char_ends) - len(tokenizer.decode(list(token_ids), skip_special_tokens=True))
    return [max(0, bisect.bisect_right(char_ends, start) - max(0, dropped)) for start in starts]


def choice_logprobs(tokenizer, token_ids: tuple[int, ...], logprobs: tuple[TokenLogprobs, ...],
                    cut_at: Optional[int]) -> tuple[TokenLogprob, ...]:
    """Each generated token's entry; with `cut_at` (the text was cut there, before a stop string) only the tokens
    whose text starts before the cut."""
    entries = []
    for token_id, found, offset in zip(token_ids, logprobs, _char_offsets(tokenizer, token_ids)):
        if cut_at is not None and offset >= cut_at:
            break
        alternatives = []
        for alternative, value in zip(found.top_ids, found.top_logprobs):
            text, raw = token_text(tokenizer, alternative)
            alternatives.append(TopLogprob(token=text, logprob=value, bytes=tuple(raw)))
        text, raw = token_text(tokenizer, token_id)
        entries.append(TokenLogprob(token=text, logprob=found.logprob, bytes=tuple(raw), text_offset=offset,
                                    top_logprobs=tuple(alternatives)))
    return tuple(entries)
