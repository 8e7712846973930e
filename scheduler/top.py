"""`lorafleet top`: a live view of the fleet for operators, read from the store (Redis), not from Prometheus.

`read_snapshot(store)` reads one `FleetSnapshot` in a few round trips; `render(snapshot, width)` turns it into a rich
renderable (pure: the same snapshot and width give the same screen); `snapshot_json` into what `--json` prints;
`run_live` redraws it every few seconds until `q` or Ctrl-C.

Every CLI table keeps its id columns whole on one line (`table`): ids are copied into `executors drain`,
`jobs cancel`, ... Where the terminal is too narrow for all of its columns, a `top` table drops its least needed
ones rather than fold cells; a wider terminal shows more of them.
"""

from __future__ import annotations

import dataclasses
import os
import select
import sys
import termios
import time
import tty
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Collection, Iterator, Mapping, Optional, Sequence

import redis
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from lorafleet.scheduler import fleet, keys
from lorafleet.scheduler.generation import queued_by_base
from lorafleet.scheduler.records import ExecutorHeartbeat, JobRecord
from lorafleet.scheduler.store import JobStore

ID_COLUMNS = ("job_id", "executor")  # kept whole on one line at any width: they are copied into other commands
GIB = 1024**3
BAR_CELLS = 10


def table(title: Optional[str], columns: Sequence[str], rows: list[list[str]], right: Collection[str] = (),
          **style: Any) -> Table:
    """A table whose id columns (`ID_COLUMNS`) never wrap; other cells fold when the terminal is too narrow."""
    built = Table(title=title, **style)
    for i, column in enumerate(columns):
        whole = column in ID_COLUMNS
        built.add_column(column, no_wrap=whole, overflow="fold", justify="right" if column in right else "left",
                         min_width=max([len(column), *(len(row[i]) for row in rows)]) if whole else None)
    for row in rows:
        built.add_row(*row)
    return built


# ---- the snapshot ----


@dataclass(frozen=True)
class CohortJob:
    """A job scheduled on or running at an executor, as `top` shows it."""

    job_id: str
    tenant: str
    name: str
    state: str
    step: int
    total_steps: int
    loss: Optional[float]
    tokens_per_s: Optional[float]

    @classmethod
    def of(cls, record: JobRecord) -> "CohortJob":
        return cls(record.job_id, record.tenant, record.name, record.state.value, record.step, record.total_steps,
                   record.metrics.get("loss"), record.metrics.get("tokens_per_s"))


@dataclass(frozen=True)
class ExecutorStatus:
    """A live executor: its last heartbeat, whether it was asked to drain, the jobs the store gives it."""

    heartbeat: ExecutorHeartbeat
    draining: bool
    cohort: tuple[CohortJob, ...]

    @property
    def state(self) -> str:
        if self.draining:
            return "draining"
        if not self.cohort:
            return "idle"
        # A job is `running` once its executor took it into the cohort; before, it loads the base or the data.
        return "training" if any(job.state == "running" for job in self.cohort) else "loading"

    @property
    def memory_used_bytes(self) -> int:
        """NVML's reading of the whole device where there is one, else the executor's own last peak."""
        gpu = self.heartbeat.gpu
        return gpu.memory_used_bytes if gpu else self.heartbeat.peak_bytes

    @property
    def memory_total_bytes(self) -> int:
        gpu = self.heartbeat.gpu
        return gpu.memory_total_bytes if gpu else self.heartbeat.total_bytes

    @property
    def utilization(self) -> Optional[float]:
        return self.heartbeat.gpu.utilization if self.heartbeat.gpu else None

    @property
    def tokens_per_s(self) -> Optional[float]:
        """Target tokens trained per second in its last step (what "tokens trained" counts everywhere)."""
        step = self.heartbeat.last_step
        return step.trained_tokens / step.seconds if step and step.seconds > 0 else None


@dataclass(frozen=True)
class TenantQueue:
    tenant: str
    queued: int
    scheduled: int
    running: int
    paused: int
    max_running: int
    max_queued: int
    weight: float
    disabled: bool

    @property
    def active(self) -> bool:
        return bool(self.queued or self.scheduled or self.running or self.paused)


@dataclass(frozen=True)
class FleetSnapshot:
    taken_at: float
    leader: Optional[str]  # the scheduler holding the leader lock (host-pid), None when none does
    executors: tuple[ExecutorStatus, ...]
    tenants: tuple[TenantQueue, ...]
    jobs: Mapping[str, int]  # state -> jobs in it, all tenants
    generation_queued: Mapping[str, int] = dataclasses.field(default_factory=dict)  # base -> requests waiting

    @property
    def memory_used_bytes(self) -> int:
        return sum(executor.memory_used_bytes for executor in self.executors)

    @property
    def memory_total_bytes(self) -> int:
        return sum(executor.memory_total_bytes for executor in self.executors)

    @property
    def tokens_per_s(self) -> float:
        return sum(executor.tokens_per_s or 0.0 for executor in self.executors)


def read_snapshot(store: JobStore) -> FleetSnapshot:
    """The fleet as the store has it now: live executors with their drain flags and held jobs, the leader, every
    tenant's queue and the job counts (reads only)."""
    alive, _dead = fleet.executors(store.r)
    pipe = store.r.pipeline(transaction=False)
    for beat in alive:
        pipe.get(keys.executor_drain(beat.executor_id))
        pipe.hkeys(keys.holding(beat.executor_id))
    pipe.get(keys.SCHEDULER_LEADER)
    *per_executor, leader = pipe.execute()
    drains, held = per_executor[::2], [sorted(ids) for ids in per_executor[1::2]]
    records = {record.job_id: record for record in store.jobs([job_id for ids in held for job_id in ids])}
    executors = tuple(
        ExecutorStatus(beat, drain == "1", tuple(CohortJob.of(records[i]) for i in ids if i in records))
        for beat, drain, ids in zip(alive, drains, held)
    )
    tenants = tuple(
        TenantQueue(t["name"], t["counts"]["queued"], t["counts"]["scheduled"], t["counts"]["running"],
                    t["counts"]["paused"], t["max_running"], t["max_queued"], t["weight"], t["disabled"])
        for t in store.list_tenants()
    )
    return FleetSnapshot(time.time(), leader, executors, tenants, store.counts(), queued_by_base(store.r))


def snapshot_json(snapshot: FleetSnapshot) -> dict[str, Any]:
    """The snapshot as plain JSON values: its records' fields, plus what `top` derives from them."""
    data = dataclasses.asdict(snapshot)
    for status, view in zip(snapshot.executors, data["executors"]):
        view.update(state=status.state, memory_used_bytes=status.memory_used_bytes,
                    memory_total_bytes=status.memory_total_bytes, utilization=status.utilization,
                    tokens_per_s=status.tokens_per_s)
    data["totals"] = {"executors": len(snapshot.executors), "memory_used_bytes": snapshot.memory_used_bytes,
                      "memory_total_bytes": snapshot.memory_total_bytes, "tokens_per_s": snapshot.tokens_per_s}
    return data


# ---- rendering ----


@dataclass(frozen=True)
class Column:
    header: str
    keep: int  # lower is kept first when the width runs out
    cell: Callable[[Any], str]
    right: bool = False  # numbers are right-aligned


def fitting(columns: Sequence[Column], rows: list[list[str]], width: int) -> list[int]:
    """Indices (in display order) of the columns to show: the most needed first, while the table still fits."""
    # Columns are 3 apart (a space each side of a divider), with nothing outside the first and last.
    need = [max([len(column.header), *(len(row[i]) for row in rows)]) + 3 for i, column in enumerate(columns)]
    kept, used = [], -3
    for i in sorted(range(len(columns)), key=lambda i: columns[i].keep):
        if used + need[i] <= width or not kept:
            kept.append(i)
            used += need[i]
    return sorted(kept)


def fitted_table(title: Optional[str], columns: Sequence[Column], items: Sequence[Any], width: int) -> Table:
    rows = [[column.cell(item) for column in columns] for item in items]
    shown = fitting(columns, rows, width)
    return table(title, [columns[i].header for i in shown], [[row[i] for i in shown] for row in rows],
                 right={columns[i].header for i in shown if columns[i].right}, box=box.SIMPLE_HEAD,
                 title_justify="left", title_style="bold", show_edge=False, pad_edge=False)


def _number(value: Optional[float], fmt: str = ",.0f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _memory(used: int, total: int) -> str:
    digits = 0 if total >= 10 * GIB else 1  # "62/80G", "0.4/7.5G"
    return f"{used / GIB:.{digits}f}/{total / GIB:.{digits}f}G"


def _bar(fraction: float) -> str:
    filled = round(min(max(fraction, 0.0), 1.0) * BAR_CELLS)
    return "#" * filled + "." * (BAR_CELLS - filled)


def _age(seconds: float) -> str:
    return f"{max(seconds, 0):.0f}s"


def _executor_columns(now: float) -> list[Column]:
    return [
        Column("executor", 0, lambda e: e.heartbeat.executor_id),
        Column("device", 7, lambda e: e.heartbeat.device),
        Column("state", 1, lambda e: e.state),
        Column("jobs", 3, lambda e: str(len(e.cohort)), right=True),
        Column("memory", 2, lambda e: _memory(e.memory_used_bytes, e.memory_total_bytes), right=True),
        Column("mem use", 8, lambda e: _bar(e.memory_used_bytes / e.memory_total_bytes if e.memory_total_bytes else 0)),
        Column("util", 5, lambda e: _percent(e.utilization), right=True),
        Column("tok/s", 4, lambda e: _number(e.tokens_per_s), right=True),
        Column("step", 6, lambda e: _number(e.heartbeat.last_step and e.heartbeat.last_step.seconds, ".2f", "s"),
               right=True),
        Column("mfu", 9, lambda e: _percent(e.heartbeat.last_step and e.heartbeat.last_step.mfu), right=True),
        Column("beat", 10, lambda e: _age(now - e.heartbeat.heartbeat_at), right=True),
        Column("host", 11, lambda e: e.heartbeat.host),
        Column("base", 12, lambda e: e.heartbeat.compat_key or "-"),
    ]


COHORT_COLUMNS = [
    Column("job_id", 0, lambda j: j.job_id),
    Column("tenant", 1, lambda j: j.tenant),
    Column("name", 6, lambda j: j.name),
    Column("state", 4, lambda j: j.state),
    Column("progress", 2, lambda j: f"{j.step}/{j.total_steps}" if j.total_steps else "-", right=True),
    Column("loss", 3, lambda j: _number(j.loss, ".4f"), right=True),
    Column("tok/s", 5, lambda j: _number(j.tokens_per_s), right=True),
]

QUEUE_COLUMNS = [
    Column("tenant", 0, lambda t: t.tenant + (" (disabled)" if t.disabled else "")),
    Column("queued", 1, lambda t: str(t.queued), right=True),
    Column("scheduled", 4, lambda t: str(t.scheduled), right=True),
    Column("running", 2, lambda t: str(t.running), right=True),
    Column("max_running", 3, lambda t: str(t.max_running), right=True),
    Column("paused", 5, lambda t: str(t.paused), right=True),
    Column("max_queued", 7, lambda t: str(t.max_queued), right=True),
    Column("weight", 6, lambda t: f"{t.weight:g}", right=True),
]


def _summary(snapshot: FleetSnapshot) -> Text:
    at = datetime.fromtimestamp(snapshot.taken_at, timezone.utc).strftime("%H:%M:%S UTC")
    by_state: dict[str, int] = {}
    for executor in snapshot.executors:
        by_state[executor.state] = by_state.get(executor.state, 0) + 1
    states = ", ".join(f"{n} {state}" for state, n in sorted(by_state.items()))
    jobs = ", ".join(f"{snapshot.jobs.get(state, 0)} {state}" for state in ("queued", "scheduled", "running", "paused"))
    return Text.assemble(
        ("lorafleet top", "bold"), f"  {at}  leader: ", snapshot.leader or ("none", "bold red"), "\n",
        f"executors: {len(snapshot.executors)}" + (f" ({states})" if states else ""),
        f"  memory: {_memory(snapshot.memory_used_bytes, snapshot.memory_total_bytes)}",
        f"  tok/s: {snapshot.tokens_per_s:,.0f}\n",
        f"jobs: {jobs}",
        f"  generation: {sum(snapshot.generation_queued.values())} queued",
    )


def render(snapshot: FleetSnapshot, width: int, footer: Optional[str] = None) -> RenderableType:
    """The whole screen for a terminal `width` columns wide."""
    parts: list[RenderableType] = [_summary(snapshot), Text()]
    if snapshot.executors:
        parts.append(fitted_table("executors", _executor_columns(snapshot.taken_at), snapshot.executors, width))
    else:
        parts.append(Text("no live executor"))
    for executor in snapshot.executors:
        if executor.cohort:
            parts.append(fitted_table(f"cohort on {executor.heartbeat.executor_id}", COHORT_COLUMNS,
                                      executor.cohort, width))
    active = sorted((t for t in snapshot.tenants if t.active), key=lambda t: (-t.queued - t.running, t.tenant))
    idle = len(snapshot.tenants) - len(active)
    if active:
        parts.append(fitted_table("queue by tenant", QUEUE_COLUMNS, active, width))
    if idle:
        parts.append(Text(f"{idle} tenant{'' if idle == 1 else 's'} with no queued, running or paused job",
                          style="dim"))
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)


# ---- the live view ----


@contextmanager
def _keypresses() -> Iterator[Callable[[float], str]]:
    """wait(seconds) -> the key pressed within that time ('' if none). The terminal is in cbreak mode meanwhile (keys
    arrive unbuffered, Ctrl-C still interrupts) and restored after; without a terminal, wait only sleeps."""
    if not sys.stdin.isatty():
        yield lambda seconds: time.sleep(seconds) or ""
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield lambda seconds: os.read(fd, 1).decode(errors="replace") if select.select([fd], [], [], seconds)[0] else ""
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_live(read: Callable[[], FleetSnapshot], interval: float, console: Console) -> None:
    """Redraw the fleet every `interval` seconds until `q` or Ctrl-C. Redis going away shows as a line and is
    retried (the view is for watching an incident too); any other error ends it."""
    footer = f"every {interval:g} s; q quits"
    try:
        with _keypresses() as wait, Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                try:
                    frame = render(read(), console.width, footer)
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    frame = Text(f"cannot read Redis: {' '.join(str(exc).split())}; retrying ({footer})")
                live.update(frame, refresh=True)
                if wait(interval).lower() == "q":
                    return
    except KeyboardInterrupt:
        return
