"""What a dataset record means: the JSONL formats, and how one record becomes tokens and labels.

The one definition of a training example, used at submission (to check a dataset and count its target tokens) and
by the executor (to train on it).

Formats (one JSON object per line; blank lines are skipped; extra keys are ignored):

- alpaca: `{"instruction": str, "input": str (optional, may be null or ""), "output": str}`, rendered with the
  Alpaca prompt (`ALPACA_PROMPT` / `ALPACA_PROMPT_NO_INPUT`); the loss covers `output` + EOS.
- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` with at least one assistant
  turn; the loss covers every assistant turn. With a tokenizer chat template the conversation is rendered by
  `apply_chat_template` (which supplies any BOS) and an assistant turn's target is what the template emits for it after
  the generation prompt: its content and the template's own end-of-turn marker. For templates that re-render earlier
  turns as a conversation grows, the target is the content, plus the EOS text when the template puts it right after.
  Without a template the plain fallback format is `"System:\n{content}\n\n"`, `"User:\n{content}\n\n"` and
  `"Assistant:\n"` + target `{content}<eos>`, turn after turn.
- text: `{"text": str}`; the loss covers every token, and EOS is appended.

Preference pairs, for DPO jobs (`method: dpo`); each record is two sequences, the chosen and the rejected answer to
one prompt, and the loss covers the answers only:

- preference: `{"prompt": str, "chosen": str, "rejected": str}`: `prompt + chosen + EOS` and `prompt + rejected + EOS`,
  each tokenised whole; the targets are the answer and its EOS.
- chat_preference (OpenAI's DPO format): `{"input": {"messages": [...]}, "preferred_output": [assistant messages],
  "non_preferred_output": [assistant messages]}`: the conversation followed by either output, rendered as a chat;
  the targets are the output's assistant turns only (not the assistant turns of the input).

Labels follow the Hugging Face convention: aligned with `input_ids`, -100 where there is no loss, and the logits at
position t predict `labels[t + 1]` (shift inside the loss). `labels[0]` is always -100, since nothing predicts the
first token, so `Example.num_targets` is exactly the number of tokens the loss averages over.

Truncation keeps the first `max_seq_len` tokens. An example whose targets all fall beyond the cut still counts (it
keeps its place in the epoch) but has `num_targets == 0`, and a whole micro-batch can have zero targets: the caller
must skip its loss rather than divide by zero.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
SFT_FORMATS = ("alpaca", "chat", "text")
PREFERENCE_FORMATS = ("preference", "chat_preference")  # pairs: DPO jobs only
FORMATS = SFT_FORMATS + PREFERENCE_FORMATS
# The key that tells a record's format
FORMAT_KEYS = {"alpaca": "instruction", "chat": "messages", "text": "text", "preference": "chosen",
               "chat_preference": "preferred_output"}
CHAT_ROLES = ("system", "user", "assistant")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
FALLBACK_CHAT_HEADERS = {"system": "System:\n", "user": "User:\n", "assistant": "Assistant:\n"}


class DataError(ValueError):
    """Unusable training data; the message names the file and, for a bad record, its 1-based line number."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    # A preference pair when > 0: `input_ids` holds the chosen sequence's `chosen_length` tokens, then the rejected
    # sequence's (two sequences packed back to back, attention within each)
    chosen_length: int = 0

    def sequences(self) -> list[tuple[int, int]]:
        """(start, end) of each sequence in `input_ids`: one, or the chosen and the rejected of a pair."""
        if self.chosen_length:
            return [(0, self.chosen_length), (self.chosen_length, len(self.input_ids))]
        return [(0, len(self.input_ids))] if self.input_ids else []

    @property
    def num_targets(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)  # counted in C: read every step, for every example


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def detect_format(record: dict) -> str:
    """The record's format (`FORMATS`), from which of the keys of `FORMAT_KEYS` it has."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {_json_type(record)}")
    found = [fmt for fmt, key in FORMAT_KEYS.items() if key in record]
    if not found:
        keys = ", ".join(repr(key) for key in list(record)[:8]) or "none"
        expected = ", ".join(repr(key) for key in FORMAT_KEYS.values())
        raise DataError(f"unknown format: expected one of the keys {expected} (keys: {keys})")
    if len(found) > 1:
        raise DataError(f"ambiguous format: the record fits {' and '.join(found)}")
    return found[0]


def _string_field(record: dict, key: str, optional: bool = False) -> str:
    if key not in record or (optional and record[key] is None):
        if optional:
            return ""
        raise DataError(f"missing '{key}'")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"'{key}' must be a string, got {_json_type(value)}")
    return value


def _chat_messages(record: dict) -> list[dict]:
    if "messages" not in record:
        raise DataError("missing 'messages'")
    clean = _message_list(record["messages"], "messages")
    if not any(message["role"] == "assistant" for message in clean):
        raise DataError("no assistant message, so nothing to learn from")
    return clean


def _message_list(messages: object, field: str, roles: tuple[str, ...] = CHAT_ROLES) -> list[dict]:
    """A non-empty array of `{"role", "content"}` messages with roles among `roles`, as plain dicts; DataError naming
    `field` and the message."""
    if not isinstance(messages, list):
        raise DataError(f"'{field}' must be an array, got {_json_type(messages)}")
    if not messages:
        raise DataError(f"'{field}' is empty")
    where = "" if field == "messages" else f"{field}: "
    clean = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise DataError(f"{where}message {number} must be an object, got {_json_type(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"{where}message {number}: missing '{key}'")
        role = message["role"]
        if role not in roles:
            shown = repr(role) if isinstance(role, str) else _json_type(role)
            allowed = ", ".join(roles[:-1]) + " or " + roles[-1] if len(roles) > 1 else f"only {roles[0]}"
            raise DataError(f"{where}message {number}: unknown role {shown} (use {allowed})")
        content = message["content"]
        if not isinstance(content, str):
            raise DataError(f"{where}message {number}: 'content' must be a string, got {_json_type(content)}")
        clean.append({"role": role, "content": content})
    return clean


def _preference_texts(record: dict) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of a preference record."""
    return tuple(_string_field(record, key) for key in ("prompt", "chosen", "rejected"))


def _chat_preference(record: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(conversation, preferred output, non-preferred output) of a chat_preference record."""
    if "input" not in record:
        raise DataError("missing 'input'")
    conversation = record["input"]
    if not isinstance(conversation, dict):
        raise DataError(f"'input' must be an object with 'messages', got {_json_type(conversation)}")
    if "messages" not in conversation:
        raise DataError("input: missing 'messages'")
    messages = _message_list(conversation["messages"], "input.messages")
    outputs = []
    for key in ("preferred_output", "non_preferred_output"):
        if key not in record:
            raise DataError(f"missing '{key}'")
        outputs.append(_message_list(record[key], key, roles=("assistant",)))
    return messages, outputs[0], outputs[1]


class Tokenizing:
    """Renders one validated record as text with character ranges to learn, then tokenises the whole text at once.

    Tokenising the whole text (not prompt and response apart) gives exactly the tokens inference sees: a
    SentencePiece tokenizer, for one, would otherwise start every response with a word-boundary marker.
    """

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token")
        if tokenizer.encode(tokenizer.eos_token, add_special_tokens=False) != [tokenizer.eos_token_id]:
            raise ValueError(f"the tokenizer does not read its EOS text {tokenizer.eos_token!r} as the EOS token")
        try:
            tokenizer("a", add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            raise ValueError("the tokenizer cannot map tokens to characters; use a fast (tokenizers) one") from None
        self.tokenizer = tokenizer
        self.eos_text = tokenizer.eos_token
        self.bos = self._bos_it_adds(tokenizer)
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.max_token_chars = max((len(token) for token in tokenizer.get_vocab()), default=1)

    @staticmethod
    def _bos_it_adds(tokenizer) -> list[int]:
        # Our own formats are tokenised without special tokens, so add BOS ourselves when the model expects it.
        bos = tokenizer.bos_token_id
        if bos is None:
            return []
        with_special = tokenizer("a")["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        return [bos] if with_special[:1] == [bos] and plain[:1] != [bos] else []

    def example(self, fmt: str, record: dict, max_seq_len: int) -> tuple[array, array]:
        return self._tokens(*getattr(self, fmt)(record), max_seq_len)

    def pair(self, fmt: str, record: dict, max_seq_len: int) -> tuple[array, array, int]:
        """A preference record's chosen and rejected sequences back to back, each cut to `max_seq_len` tokens, and
        the chosen one's length."""
        chosen, rejected = getattr(self, fmt)(record)
        chosen_ids, chosen_labels = self._tokens(*chosen, max_seq_len)
        rejected_ids, rejected_labels = self._tokens(*rejected, max_seq_len)
        return chosen_ids + rejected_ids, chosen_labels + rejected_labels, len(chosen_ids)

    def _tokens(self, prefix: list[int], text: str, targets: list[tuple[int, int]], max_seq_len: int
                ) -> tuple[array, array]:
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = array("i", prefix)
        labels = array("i", [IGNORE_INDEX] * len(prefix))
        for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
            if len(input_ids) == max_seq_len:
                break
            input_ids.append(token)
            # A token straddling a boundary (a space before a word, say) is learned with the target it reaches into.
            inside = any((start < stop and end > begin) or begin <= start == end < stop for begin, stop in targets)
            labels.append(token if inside else IGNORE_INDEX)
        if labels:
            labels[0] = IGNORE_INDEX
        return input_ids, labels

    def alpaca(self, record: dict) -> tuple[list[int], str, list[tuple[int, int]]]:
        instruction = _string_field(record, "instruction")
        context = _string_field(record, "input", optional=True)
        output = _string_field(record, "output")
        if context:
            prompt = ALPACA_PROMPT.format(instruction=instruction, input=context)
        else:
            prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
        text = prompt + output + self.eos_text
        return self.bos, text, [(len(prompt), len(text))]

    def text(self, record: dict) -> tuple[list[int], str, list[tuple[int, int]]]:
        text = _string_field(record, "text") + self.eos_text
        return self.bos, text, [(0, len(text))]

    def preference(self, record: dict) -> list[tuple[list[int], str, list[tuple[int, int]]]]:
        prompt, chosen, rejected = _preference_texts(record)
        renderings = []
        for answer in (chosen, rejected):
            text = prompt + answer + self.eos_text
            renderings.append((self.bos, text, [(len(prompt), len(text))]))
        return renderings

    def chat_preference(self, record: dict) -> list[tuple[list[int], str, list[tuple[int, int]]]]:
        messages, preferred, non_preferred = _chat_preference(record)
        renderings = []
        for output in (preferred, non_preferred):
            prefix, text, targets = self._conversation(messages + output)
            renderings.append((prefix, text, targets[-len(output):]))  # the output's turns, not the input's
        return renderings

    def chat(self, record: dict) -> tuple[list[int], str, list[tuple[int, int]]]:
        return self._conversation(_chat_messages(record))

    def _conversation(self, messages: list[dict]) -> tuple[list[int], str, list[tuple[int, int]]]:
        if self.has_chat_template:
            return [], *self._template_targets(messages)
        text, targets = "", []
        for message in messages:
            text += FALLBACK_CHAT_HEADERS[message["role"]]
            if message["role"] == "assistant":
                targets.append((len(text), len(text) + len(message["content"]) + len(self.eos_text)))
                text += message["content"] + self.eos_text
            else:
                text += message["content"] + "\n\n"
        return self.bos, text, targets

    def prompt(self, fmt: str, text: str) -> list[int]:
        """The tokens a record of `fmt` puts before its answer when `text` is its prompt: what a trained adapter is
        asked to complete (a job's eval_samples). Alpaca: the instruction prompt without input; chat: one user
        message and the generation prompt; text and preference: the text itself."""
        if fmt == "alpaca":
            prefix, rendered = self.bos, ALPACA_PROMPT_NO_INPUT.format(instruction=text)
        elif fmt in ("chat", "chat_preference") and self.has_chat_template:
            prefix, rendered = [], self._render([{"role": "user", "content": text}], add_generation_prompt=True)
        elif fmt in ("chat", "chat_preference"):
            prefix = self.bos
            rendered = FALLBACK_CHAT_HEADERS["user"] + text + "\n\n" + FALLBACK_CHAT_HEADERS["assistant"]
        else:
            prefix, rendered = self.bos, text
        return prefix + self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja templates raise whatever their authors chose (TemplateError, ValueError, ...)
            raise DataError(f"the chat template rejects this conversation: {exc}") from None

    def _template_targets(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        # Render growing prefixes of the conversation: an assistant turn's target is what its rendering adds after the
        # generation prompt (content and end-of-turn marker).
        rendered = ""
        targets = []
        for count, message in enumerate(messages, start=1):
            if message["role"] == "assistant":
                prompt = self._render(messages[: count - 1], add_generation_prompt=True)
                if not prompt.startswith(rendered):
                    return self._located_targets(messages)
                rendered = prompt
            full = self._render(messages[:count], add_generation_prompt=False)
            if not full.startswith(rendered):
                return self._located_targets(messages)
            if message["role"] == "assistant":
                targets.append((len(rendered), len(full)))
            rendered = full
        return rendered, targets

    def _located_targets(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        # Some templates re-render earlier turns as the conversation grows (Mistral moves the system prompt to the
        # last user turn; reasoning templates drop old thoughts). Then find the user and assistant contents, in order,
        # in the full rendering; an assistant target is its content plus the EOS text if the template puts it next.
        text = self._render(messages, add_generation_prompt=False)
        targets = []
        search_from = 0  # a reply is searched for only after the question it answers
        for number, message in enumerate(messages, start=1):
            if message["role"] == "system":
                continue
            content = message["content"].strip()  # templates often trim
            start = text.find(content, search_from)
            if start < 0:
                raise DataError(f"cannot find message {number} in the chat template's rendering of the conversation")
            end = start + len(content)
            if message["role"] == "assistant":
                if text.startswith(self.eos_text, end):
                    end += len(self.eos_text)
                targets.append((start, end))
            search_from = end
        return text, targets


def cut_strings(value: Any, limit: int) -> Any:
    """`value` with every string in it cut to `limit` characters."""
    if isinstance(value, str):
        return value[:limit]
    if isinstance(value, dict):
        return {key: cut_strings(item, limit) for key, item in value.items()}
    if isinstance(value, list):
        return [cut_strings(item, limit) for item in value]
    return value


def parse_record(raw: bytes, first_line: bool = False) -> dict:
    """One JSONL line as a JSON object; DataError saying what is wrong with it."""
    try:
        text = raw.decode("utf-8-sig" if first_line else "utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"not valid UTF-8 (byte {exc.start + 1} of the line)") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except ValueError as exc:  # e.g. an integer too long to convert
        raise DataError(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise DataError("invalid JSON: nested too deeply") from None
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {_json_type(record)}")
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError("a string holds an unpaired surrogate such as \\ud800 (not valid Unicode)") from None
    return record


def check_record(record: dict, fmt: str = "auto") -> str:
    """The record's format, once its fields are what that format needs (DataError naming what is wrong): every
    check `tokenise_record` makes except those that need the tokenizer, cheap enough for every line of a dataset."""
    found = detect_format(record)
    if fmt != "auto" and found != fmt:
        raise DataError(f"the record is in {found} format, but the dataset is {fmt} (one file holds one format)")
    if found == "alpaca":
        for key, optional in (("instruction", False), ("input", True), ("output", False)):
            _string_field(record, key, optional)
    elif found == "text":
        _string_field(record, "text")
    elif found == "preference":
        _preference_texts(record)
    elif found == "chat_preference":
        _chat_preference(record)
    else:
        _chat_messages(record)
    return found


class RecordLines:
    """Checks a JSONL stream chunk by chunk as it is copied: every non-blank line a complete record
    (`check_record`), all of one format, at most `record_bytes` long and at most `max_records` of them. DataError
    names the line. What submission checks of a whole dataset, and an upload of every line, without a tokenizer."""

    def __init__(self, record_bytes: int, max_records: int, fmt: str = "auto"):
        self.line_number, self.records, self.format = 1, 0, None if fmt == "auto" else fmt
        self.record_bytes, self.max_records = record_bytes, max_records
        self._line = bytearray()

    def feed(self, chunk: bytes) -> None:
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            self._add(chunk[start:end])
            self._end_line()
            start = end + 1
        self._add(chunk[start:])

    def finish(self) -> tuple[int, str]:
        """(records, format) once the stream ended."""
        self._end_line()
        if not self.records:
            raise DataError("has no records (it is empty or only blank lines)")
        return self.records, self.format

    def _add(self, part: bytes) -> None:
        self._line += part
        if len(self._line) > self.record_bytes:
            raise DataError(f"line {self.line_number} is longer than the limit of {self.record_bytes} bytes "
                            "(LORAFLEET_MAX_RECORD_BYTES)")

    def _end_line(self) -> None:
        if self._line.strip():
            self._check(bytes(self._line))
        self._line.clear()
        self.line_number += 1

    def _check(self, line: bytes) -> None:
        try:
            fmt = check_record(parse_record(line, first_line=self.line_number == 1), self.format or "auto")
        except DataError as exc:
            raise DataError(f"line {self.line_number}: {exc}") from None
        self.format = fmt
        self.records += 1
        if self.records > self.max_records:
            raise DataError(f"line {self.line_number}: more than the limit of {self.max_records} records "
                            "(LORAFLEET_MAX_RECORDS)")


def tokenise_record(tokenizing: Tokenizing, fmt: str, record: dict, max_seq_len: int) -> tuple[array, array]:
    """(input_ids, labels) of a record of a dataset in format `fmt`, truncated to `max_seq_len` tokens (a preference
    pair: both sequences back to back, each truncated)."""
    return tokenise_example(tokenizing, fmt, record, max_seq_len)[:2]


def tokenise_example(tokenizing: Tokenizing, fmt: str, record: dict, max_seq_len: int) -> tuple[array, array, int]:
    """`tokenise_record`, and the length of a preference pair's chosen sequence (0 for the other formats)."""
    try:
        found = detect_format(record)
    except DataError:
        found = None  # let the format's own checks name the missing or ambiguous key
    if found is not None and found != fmt:
        raise DataError(f"record is in {found} format, but the dataset is {fmt}")
    # No token is longer than the vocabulary's longest entry, so strings cut to max_seq_len of those keep all that
    # truncation to max_seq_len tokens can use, and one record costs a bounded time to tokenise.
    record = cut_strings(record, max_seq_len * tokenizing.max_token_chars)
    if fmt in PREFERENCE_FORMATS:
        return tokenizing.pair(fmt, record, max_seq_len)
    return *tokenizing.example(fmt, record, max_seq_len), 0
