"""Training data for one job: JSONL records → tokenised examples (`lorafleet.scheduler.formats`) → shuffled
micro-batches that resume exactly.

The file is indexed (byte offset of each non-blank line) at construction and the first record is parsed and
tokenised then; every other line is parsed and tokenised when a batch first draws it, so a bad line fails the job at
the step that reaches it with a `DataError` naming the file and the 1-based line number.
"""

from __future__ import annotations

import math
import os
import random
from array import array
from dataclasses import dataclass
from pathlib import Path

from lorafleet.scheduler.formats import (  # noqa: F401 (re-exported: the executor's and the tests' names for them)
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    FORMATS,
    IGNORE_INDEX,
    DataError,
    Example,
    Tokenizing,
    detect_format,
    parse_record,
    tokenise_example,
)

# Tokenised examples are kept in memory (8 bytes a token: id and label) up to this many tokens per job; examples
# beyond it are re-read and re-tokenised each epoch.
CACHE_TOKEN_BUDGET = 8_000_000


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch `epoch` visits the examples: a function of its arguments alone."""
    order = list(range(num_examples))
    # `random` hashes a string seed with SHA-512, so the order is the same in every process and Python version.
    random.Random(f"lorafleet-data/{seed}/{epoch}").shuffle(order)
    return order


@dataclass
class _ReadAhead:
    cursor: tuple[int, int]  # (epoch, batch_in_epoch) it was read at
    batch: list[Example]
    error: Exception | None  # what reading it raised (a bad line: DataError), raised when `next_batch` reaches it


class JobData:
    """One job's dataset: `next_batch()` yields shuffled micro-batches forever, epoch after epoch.

    Epoch e visits every example once, in a permutation drawn from (seed, e) alone; the last micro-batch of an epoch
    may be smaller. `epoch` and `batch_in_epoch` say where the next batch comes from. `state_dict()` is just that
    cursor, so a resumed job draws the identical remaining sequence.

    `read_ahead()` draws the batch at the cursor early (the cohort calls it while the GPU runs a step, so reading and
    tokenising the next records is off the step's critical path); `next_batch()` hands it out if the cursor is still
    where it was read. The cursor does not move until then, so checkpoints and resumes are as without it, and a bad
    line read ahead raises only when `next_batch()` reaches it.
    """

    def __init__(self, path, fmt: str, tokenizer, max_seq_len: int, batch_size: int, seed: int,
                 name: str | None = None):
        if fmt not in ("auto",) + FORMATS:
            raise ValueError(f"unknown dataset format {fmt!r} (use auto, {', '.join(FORMATS)})")
        if max_seq_len < 1 or batch_size < 1:
            raise ValueError("max_seq_len and batch_size must be at least 1")
        self.path = Path(path)
        self.name = name or self.path.name  # what messages call the file: the tenant's URI, never a server path
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.seed = seed
        self._tokenizing = Tokenizing(tokenizer)
        self._line_numbers, self._offsets, self._lengths, self._file_size = self._index_lines()
        self.num_examples = len(self._offsets)
        self.steps_per_epoch = math.ceil(self.num_examples / batch_size)

        self.fmt = fmt
        if fmt == "auto":
            self.fmt = self._at_line(0, lambda: detect_format(self._record(0)))
        self._cache: dict[int, tuple[array, array, int]] = {}
        self._cached_tokens = 0
        self._example(0)

        self.epoch = 0
        self.batch_in_epoch = 0
        self._order_epoch = -1
        self._order: list[int] = []
        self._ahead: _ReadAhead | None = None

    def _index_lines(self) -> tuple[array, array, array, int]:
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            raise DataError(f"{self.name}: no such file") from None
        except OSError as exc:
            raise DataError(f"{self.name}: cannot read it ({exc.strerror})") from None
        line_numbers, offsets, lengths = array("q"), array("q"), array("q")
        offset = 0
        with handle:
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    line_numbers.append(line_number)
                    offsets.append(offset)
                    lengths.append(len(line))
                offset += len(line)
        if offset == 0:
            raise DataError(f"{self.name}: the file is empty")
        if not offsets:
            raise DataError(f"{self.name}: no examples (only blank lines)")
        return line_numbers, offsets, lengths, offset

    def _open(self):
        try:
            handle = open(self.path, "rb")
        except OSError as exc:
            raise DataError(f"{self.name}: cannot read it any more ({exc.strerror})") from None
        if os.fstat(handle.fileno()).st_size != self._file_size:
            handle.close()
            raise DataError(f"{self.name}: the file changed size since the job started")
        return handle

    def _at_line(self, index: int, work):
        """Run `work()`, turning a DataError about one record into one that names the file and line."""
        try:
            return work()
        except DataError as exc:
            raise DataError(f"{self.name} line {self._line_numbers[index]}: {exc}") from None

    def _record(self, index: int, handle=None) -> dict:
        if handle is None:
            with self._open() as handle:
                return self._record(index, handle)
        handle.seek(self._offsets[index])
        raw = handle.read(self._lengths[index])
        if len(raw) != self._lengths[index]:
            raise DataError("the file changed since the job started (line is cut short)")
        return parse_record(raw, first_line=self._offsets[index] == 0)

    def _tokenise(self, record: dict) -> tuple[array, array, int]:
        return tokenise_example(self._tokenizing, self.fmt, record, self.max_seq_len)

    def _example(self, index: int, handle=None) -> Example:
        cached = self._cache.get(index)
        if cached is None:
            cached = self._at_line(index, lambda: self._tokenise(self._record(index, handle)))
            if self._cached_tokens + len(cached[0]) <= CACHE_TOKEN_BUDGET:
                self._cache[index] = cached
                self._cached_tokens += len(cached[0])
        input_ids, labels, chosen_length = cached
        return Example(input_ids=input_ids.tolist(), labels=labels.tolist(), chosen_length=chosen_length)

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            self._order = epoch_order(self.num_examples, self.seed, epoch)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> tuple[list[Example], int]:
        """The next micro-batch and the 0-based epoch it belongs to; raises DataError for a bad line in it."""
        epoch = self.epoch
        self.read_ahead()  # a no-op when the batch at the cursor was read ahead
        ahead, self._ahead = self._ahead, None
        if ahead.error is not None:
            raise ahead.error
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = epoch + 1, 0
        return ahead.batch, epoch

    def read_ahead(self) -> None:
        """Read and tokenise the batch at the cursor now, for `next_batch()` (see the class docstring); one read
        before a resume moved the cursor is replaced."""
        if self._ahead is None or self._ahead.cursor != (self.epoch, self.batch_in_epoch):
            self._ahead = self._read(self.epoch, self.batch_in_epoch)

    def peek(self) -> list[Example] | None:
        """The micro-batch `next_batch()` will hand out (the same list), as read ahead at the cursor, without moving
        it; None when nothing was read there or its read failed."""
        ahead = self._ahead
        if ahead is None or ahead.error is not None or ahead.cursor != (self.epoch, self.batch_in_epoch):
            return None
        return ahead.batch

    def _read(self, epoch: int, batch_in_epoch: int) -> _ReadAhead:
        start = batch_in_epoch * self.batch_size
        indices = self._epoch_order(epoch)[start : start + self.batch_size]
        try:
            if any(index not in self._cache for index in indices):
                with self._open() as handle:
                    batch = [self._example(index, handle) for index in indices]
            else:
                batch = [self._example(index) for index in indices]
        except Exception as exc:  # kept, not swallowed: raised where a step draws the batch, as without reading ahead
            return _ReadAhead((epoch, batch_in_epoch), [], exc)
        return _ReadAhead((epoch, batch_in_epoch), batch, None)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, now in (("num_examples", self.num_examples), ("batch_size", self.batch_size), ("seed", self.seed)):
            if state.get(key) != now:
                raise DataError(
                    f"{self.name}: cannot resume: {key} was {state.get(key)} when the state was saved, now {now}"
                )
        epoch, batch_in_epoch = state.get("epoch"), state.get("batch_in_epoch")
        if not (isinstance(epoch, int) and epoch >= 0):
            raise DataError(f"{self.name}: cannot resume: bad epoch {epoch!r}")
        if not (isinstance(batch_in_epoch, int) and 0 <= batch_in_epoch < self.steps_per_epoch):
            raise DataError(f"{self.name}: cannot resume: bad batch_in_epoch {batch_in_epoch!r}")
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
