"""`lorafleet`: the admin CLI and process entry points. Human tables by default, `--json` on every command.

User mistakes (bad spec, unknown tenant or job, bad token, nothing listening) print one `Error: ...` line and exit
non-zero; tracebacks are left for real bugs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import click
import redis
from celery.exceptions import TimeoutError as CeleryTimeout
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lorafleet.scheduler import acl, config, eval_samples, fleet, keys, stack, top
from lorafleet.scheduler.acl import TenantCredentials
from lorafleet.scheduler.artifacts import ArtifactStore
from lorafleet.scheduler.client import LorafleetClient
from lorafleet.scheduler.logs import FORMATS
from lorafleet.scheduler.metrics import ServeError
from lorafleet.scheduler.redis_server import start_redis_server, write_private
from lorafleet.scheduler.spec import JobSpec, parse_spec
from lorafleet.scheduler.store import JobStore, hash_token


def console() -> Console:
    """The terminal as it is now: its width read from the environment (COLUMNS) at each command, not at import."""
    return Console()


JOB_COLUMNS = ("job_id", "tenant", "name", "state", "priority", "progress", "loss", "submitted")
TENANT_COLUMNS = ("name", "weight", "max_queued", "max_running", "disabled", "queued", "running")


class _Cli(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ValueError, PermissionError, LookupError, config.ConfigError) as exc:
            raise click.ClickException(_one_line(exc)) from None
        except redis.exceptions.NoPermissionError as exc:
            raise click.ClickException(
                f"this Redis user may not do that ({_one_line(exc)}): commands without --token need the operator's "
                "REDIS_URL"
            ) from None
        except redis.ConnectionError as exc:
            raise click.ClickException(f"cannot reach Redis: {_one_line(exc)}") from None
        except CeleryTimeout:
            raise click.ClickException(
                "no answer from a lorafleet worker: is one running (`lorafleet up`) on this REDIS_URL?"
            ) from None


def _one_line(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, LookupError) and exc.args else str(exc)
    return " ".join(str(text).split())


def json_option(fn: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")(fn)


def token_option(fn: Callable) -> Callable:
    return click.option(
        "--token", envvar="LORAFLEET_TOKEN", help="tenant token (env LORAFLEET_TOKEN); without one, operator access"
    )(fn)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _time(ts: Optional[float]) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _job_row(job: dict) -> list[str]:
    progress = job["progress"]
    loss = job["metrics"].get("loss")
    return [
        job["job_id"], job["tenant"], job["name"], job["state"], str(job["priority"]),
        f"{progress['step']}/{progress['total_steps']}" if progress["total_steps"] else "",
        f"{loss:.4f}" if isinstance(loss, (int, float)) else "", _time(job["submitted_at"]),
    ]


def _table(title: str, columns: tuple[str, ...], rows: list[list[str]]) -> None:
    console().print(top.table(title, columns, rows))  # ids stay whole so they can be copied; other cells fold


def _show_jobs(jobs: list[dict], as_json: bool, title: str = "jobs") -> None:
    if as_json:
        _print_json(jobs)
    else:
        _table(title, JOB_COLUMNS, [_job_row(job) for job in jobs])


def _show_job(job: dict, as_json: bool) -> None:
    if as_json:
        _print_json(job)
        return
    table = Table(show_header=False, title=job["job_id"])
    for key in ("tenant", "name", "state", "priority", "attempt", "executor_id", "error", "adapter_uri",
                "checkpoint_uri"):
        table.add_row(key, "" if job.get(key) is None else str(job[key]))
    for key in ("submitted_at", "scheduled_at", "started_at", "finished_at"):
        table.add_row(key, _time(job.get(key)))
    table.add_row("progress", f"{job['progress']['step']}/{job['progress']['total_steps']}")
    table.add_row("metrics", json.dumps(job["metrics"]))
    if job.get("cancel_requested"):
        table.add_row("cancel_requested", "yes")
    console().print(table)


def _store() -> JobStore:
    store = JobStore.from_url(config.redis_url())
    store.ensure_schema()
    return store


class _Operator:
    """Same calls as LorafleetClient, straight on the store and across all tenants (no token, needs Redis access)."""

    def __init__(self, store: JobStore):
        self.store = store

    def get(self, job_id: str) -> dict:
        return self.store.get_job_for(None, job_id)

    def list(self, state: Optional[str] = None, limit: int = 100, tenant: Optional[str] = None) -> list[dict]:
        return self.store.list_jobs(tenant, state, limit)

    def cancel(self, job_id: str) -> dict:
        return self.store.cancel(None, job_id)

    def events(self, job_id: str, after: Optional[str] = None, limit: int = 100) -> list[dict]:
        return self.store.events_for(None, job_id, after, limit)


def _tenant_client(token: str) -> LorafleetClient:
    """A client as the token's tenant: through REDIS_URL when it is that tenant's broker URL, else (the operator's
    URL) through that tenant's queue, where the worker checks the token as it does for the tenant itself."""
    url = config.redis_url()
    tenant = acl.tenant_of_url(url) or _store().r.hget(keys.TOKENS, hash_token(token))
    if tenant is None:
        raise PermissionError("invalid token")
    return LorafleetClient(url, token, tenant=tenant)


def _api(token: Optional[str]) -> LorafleetClient | _Operator:
    return _tenant_client(token) if token else _Operator(_store())


@click.group(cls=_Cli)
@click.version_option(package_name="lorafleet", prog_name="lorafleet", message="%(prog)s %(version)s")
@click.option("--log-format", type=click.Choice(FORMATS), default=None,
              help="log lines of the processes this starts: text or one JSON object per line  [default: "
                   "LORAFLEET_LOG_FORMAT, else text]")
def main(log_format: Optional[str]) -> None:
    """lorafleet: multi-tenant LoRA fine-tuning. See README.md."""
    if log_format:  # through the environment: the processes `up` starts log alike
        os.environ["LORAFLEET_LOG_FORMAT"] = log_format


# ---- processes ----


@main.command()
@click.option("--device", default=None, help="executor device (default: cuda:0 when CUDA is available, else cpu)")
@click.option("--metrics-port", type=int, default=0, show_default=True,
              help="the scheduler's /metrics, /healthz and /readyz port on 127.0.0.1 (0 = any free port)")
@json_option
def up(device: Optional[str], metrics_port: int, as_json: bool) -> None:
    """Run the local demo stack: Redis, a worker, the scheduler, an executor, two demo tenants' jobs; then stop."""
    running = stack.start_redis()
    try:
        if not as_json:
            where = f"embedded, {config.embedded_redis_dir()}" if running.redis else "REDIS_URL"
            console().print(f"redis: {where}")
        local = ["--metrics-addr", "127.0.0.1"]  # a demo: this machine only
        scheduler = stack.start_process(running, "scheduler",
                                        ["scheduler", "--metrics-port", str(metrics_port), *local])
        stack.wait_for_leader(running, scheduler)
        stack.start_worker(running)
        stack.start_process(running, "executor",
                            ["executor", "--device", device or _default_device(), "--metrics-port", "0", *local])
        jobs = stack.seed_demo(running)
        if not as_json:
            _show_jobs(jobs, False, title="submitted demo jobs")
            console().print(f"logs: {config.state_dir() / 'logs'}")
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
                      TimeElapsedColumn(), console=console(), disable=as_json) as progress:
            bars = {job["job_id"]: progress.add_task(f"{job['tenant']}/{job['name']}", total=None, status="queued")
                    for job in jobs}

            def show(views: list[dict]) -> None:
                for view in views:
                    step, total = view["progress"]["step"], view["progress"]["total_steps"]
                    loss = view["metrics"].get("loss")
                    status = view["state"] + (f" loss {loss:.3f}" if loss is not None else "")
                    progress.update(bars[view["job_id"]], completed=step, total=total or None, status=status)

            final = stack.wait_for_jobs(running, [job["job_id"] for job in jobs], show)
        if as_json:
            _print_json(final)
        else:
            _table("finished demo jobs", ("job_id", "tenant", "state", "adapter (PEFT)"),
                   [[j["job_id"], j["tenant"], j["state"], j["adapter_uri"] or j["error"] or ""] for j in final])
        if any(job["state"] != "succeeded" for job in final):
            raise click.ClickException("some demo jobs did not succeed; see the table above and the logs")
    except stack.ChildExited as exc:  # e.g. the scheduler's port was taken: its own reason, on one line
        raise click.ClickException(str(exc)) from None
    finally:
        running.stop()


def _default_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


@main.command("redis")
@click.option("--dir", "data_dir", type=click.Path(path_type=Path), help="data directory (default: the state dir)")
@click.option("--port", default=0, help="port (default: a free one)")
@json_option
def redis_cmd(data_dir: Optional[Path], port: int, as_json: bool) -> None:
    """Run the embedded Redis in the foreground (AOF on, loopback, a user per role) until interrupted.

    The URL file holds the operator's URL; --json also prints each service role's own URL (`role_urls`)."""
    data_dir = data_dir or config.embedded_redis_dir()
    server = start_redis_server(data_dir, port=port)
    url_file = data_dir / "redis.url"
    write_private(url_file, server.url)
    info = {"url": server.url, "data_dir": str(data_dir), "url_file": str(url_file), "pid": server.process.pid,
            "role_urls": {role: server.role_url(role) for role in acl.ROLES if role != "operator"}}
    if as_json:
        _print_json(info)
    else:
        console().print(f"redis listening on 127.0.0.1:{server.port}, data in {data_dir}; URL in {url_file}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.process.wait()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.stop()
        url_file.unlink(missing_ok=True)


METRICS_ADDR = click.option(
    "--metrics-addr", default="0.0.0.0", show_default=True,
    help="address of the /metrics, /healthz and /readyz listener (0.0.0.0: every interface, for Prometheus)")


@main.command()
@click.option("--metrics-port", type=int, default=9464, show_default=True,
              help="/metrics, /healthz and /readyz port (0 = any free port)")
@METRICS_ADDR
@click.option("--interval", type=float, default=0.5, show_default=True, help="seconds between planning rounds")
@click.option("--lock-ttl", type=float, default=3.0, show_default=True, help="leader lock TTL in seconds")
@click.option("--packing", type=click.Choice(["optimal-fit", "fast-fit", "trivial"]), default="optimal-fit",
              show_default=True)
def scheduler(metrics_port: int, metrics_addr: str, interval: float, lock_ttl: float, packing: str) -> None:
    """The scheduler process: leader election, then cohort planning rounds. Run two for a hot standby."""
    from lorafleet.scheduler import service

    try:
        service.main(metrics_port, interval, lock_ttl, packing, metrics_addr)
    except ServeError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--device", default="cpu", show_default=True, help="cuda:N or cpu")
@click.option("--id", "executor_id", default=None, help="executor id (default: host-device, stable across restarts)")
@click.option("--metrics-port", type=int, default=None,
              help="/metrics, /healthz and /readyz port  [default: 9465 + N for cuda:N, 9465 on a CPU; 0 = any free "
                   "port]")
@METRICS_ADDR
@click.option("--memory-bytes", type=int, default=None, help="memory the scheduler may plan with (default: device total)")
@click.option("--heartbeat-ttl", type=float, default=10.0, show_default=True,
              help="seconds without a heartbeat before the scheduler declares this executor dead")
@click.option("--activation-checkpointing", type=click.IntRange(min=0), default=0, show_default=True,
              help="recompute every N-th decoder layer in the backward (0 off, 1 all): fits larger cohorts")
@click.option("--peak-tflops", type=click.FloatRange(min=0, min_open=True), default=None,
              help="the device's dense bf16 peak, for the MFU metric (default: the data sheet's for known GPUs)")
@click.option("--max-pass-tokens", type=click.IntRange(min=0), default=8192, show_default=True,
              help="run each step in passes, so that the scheduler can plan this executor's memory with one pass of N "
                   "tokens (same gradients); on a GPU, passes are as large as free memory allows, never under N; "
                   "0: always one pass")
def executor(device: str, executor_id: Optional[str], metrics_port: Optional[int], metrics_addr: str,
             memory_bytes: Optional[int], heartbeat_ttl: float, activation_checkpointing: int,
             peak_tflops: Optional[float], max_pass_tokens: int) -> None:
    """An executor process: trains the cohort the scheduler assigns to this device."""
    try:
        from lorafleet.executor import worker
    except ImportError as exc:
        raise click.ClickException(f"the executor needs the 'executor' extra (pip install 'lorafleet[executor]'): {exc}")
    try:
        worker.main(device, executor_id, metrics_port, memory_bytes, heartbeat_ttl, activation_checkpointing,
                    max_pass_tokens or None, metrics_addr, peak_tflops)
    except ServeError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), default=None, help="TLS private key")
@click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), default=None, help="TLS certificate")
@click.option("--root-path", default="", help="path prefix a reverse proxy serves the gateway under")
def gateway(host: str, port: int, ssl_keyfile: Optional[str], ssl_certfile: Optional[str], root_path: str) -> None:
    """The tenants' HTTP API (OpenAI-compatible fine-tuning: files and jobs), on this deployment's store."""
    from lorafleet.gateway import app  # here, so that the control plane never imports the gateway's web stack

    if bool(ssl_keyfile) != bool(ssl_certfile):
        raise click.UsageError("--ssl-keyfile and --ssl-certfile go together")
    app.serve(host, port, ssl_keyfile, ssl_certfile, root_path)


@main.group()
def executors() -> None:
    """List executors and drain them."""


@executors.command("list")
@json_option
def executors_list(as_json: bool) -> None:
    """Executors with a live heartbeat."""
    alive, _dead = fleet.executors(_store().r)
    if as_json:
        _print_json([dataclasses.asdict(beat) for beat in alive])
        return
    gib = 1024**3
    _table("executors", ("executor", "host", "device", "base", "jobs", "peak GiB", "total GiB", "pass tokens"),
           [[e.executor_id, e.host, e.device, e.compat_key or "-", str(len(e.jobs)), f"{e.peak_bytes / gib:.1f}",
             f"{e.total_bytes / gib:.1f}", str(e.max_pass_tokens or "-")] for e in alive])


@executors.command("drain")
@click.argument("executor_id")
@json_option
def executors_drain(executor_id: str, as_json: bool) -> None:
    """Ask an executor to checkpoint its jobs, hand them back to the queue and exit."""
    if not fleet.request_drain(_store().r, executor_id):
        raise click.ClickException(f"no live executor {executor_id!r} (see `lorafleet executors list`)")
    if as_json:
        _print_json({"executor_id": executor_id, "drain": True})
    else:
        console().print(f"drain requested for {executor_id}")


@main.command("top")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="seconds between refreshes")
@click.option("--once", is_flag=True, help="print one frame and exit")
@json_option
def top_cmd(interval: float, once: bool, as_json: bool) -> None:
    """Live fleet view (operator, from Redis): executors, GPU memory and use, cohorts, queue by tenant. q quits."""
    store, terminal = _store(), console()
    if as_json:
        _print_json(top.snapshot_json(top.read_snapshot(store)))
    elif once or not terminal.is_terminal:
        terminal.print(top.render(top.read_snapshot(store), terminal.width))
    else:
        top.run_live(lambda: top.read_snapshot(store), interval, terminal)


@main.command()
@json_option
def schema(as_json: bool) -> None:
    """Print the job spec's JSON schema."""
    _print_json(JobSpec.model_json_schema())


@main.command()
@click.option("--jobs", "num_jobs", type=int, default=10_000, show_default=True)
@click.option("--tenants", "num_tenants", type=int, default=200, show_default=True)
@click.option("--executors", "num_executors", type=int, default=100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--load", type=float, default=0.9, show_default=True, help="offered work / fleet capacity")
@json_option
def simulate(num_jobs: int, num_tenants: int, num_executors: int, seed: int, load: float, as_json: bool) -> None:
    """Simulate a fleet under the scheduling policy and under FIFO one-job-per-GPU (no Redis, no GPU)."""
    from lorafleet.scheduler import simulate as simulation

    try:
        result = simulation.run_simulation(num_jobs, num_tenants, num_executors, seed, load)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        _print_json(result)
    else:
        click.echo(simulation.format_table(result))


# ---- tenants ----


@main.command("roles")
@json_option
def roles_cmd(as_json: bool) -> None:
    """Create (or give new passwords to) the worker, scheduler, executor and gateway users on REDIS_URL (the
    operator's), turn the default user off, and print each role's URL: give each process its own. Old role passwords
    stop working."""
    store = _store()
    passwords = {role: secrets.token_urlsafe(24) for role in acl.ROLES if role != "operator"}
    acl.apply_roles(store.r, passwords)
    urls = {role: acl.url_for(store.server_url(), acl.username(role), password) for role, password in passwords.items()}
    if as_json:
        _print_json(urls)
    else:
        _table("service roles (shown once)", ("role", "REDIS_URL"), [[role, url] for role, url in urls.items()])


@main.group()
def tenants() -> None:
    """Create and manage tenants (needs Redis access)."""


def _show_tenants(items: list[dict], as_json: bool) -> None:
    if as_json:
        _print_json(items)
        return
    rows = [
        [t["name"], f"{t['weight']:g}", str(t["max_queued"]), str(t["max_running"]), "yes" if t["disabled"] else "",
         str(t["counts"]["queued"]), str(t["counts"]["running"])]
        for t in items
    ]
    _table("tenants", TENANT_COLUMNS, rows)


def _show_credentials(tenant: dict, credentials: TenantCredentials, as_json: bool) -> None:
    if as_json:
        _print_json({**tenant, **credentials.to_json()})
        return
    _show_tenants([tenant], False)
    terminal = console()
    terminal.print("shown once, store them now (only hashes are kept):", soft_wrap=True)
    terminal.print(f"token:       [bold]{credentials.token}[/bold]", soft_wrap=True)
    terminal.print(f"broker_url:  [bold]{credentials.broker_url}[/bold]", soft_wrap=True)
    terminal.print(f"celery_config: {json.dumps(credentials.to_json()['celery_config'])}", soft_wrap=True)


@tenants.command("create")
@click.argument("name")
@click.option("--weight", default=1.0, show_default=True, help="fair-share weight")
@click.option("--max-queued", default=100, show_default=True, help="max jobs waiting in the queue")
@click.option("--max-running", default=4, show_default=True, help="max jobs training at once")
@json_option
def tenants_create(name: str, weight: float, max_queued: int, max_running: int, as_json: bool) -> None:
    """Create a tenant; print its token, its own broker URL and its Celery settings, once."""
    store = _store()
    tenant, token = store.create_tenant(name, weight=weight, max_queued=max_queued, max_running=max_running)
    _show_credentials(tenant, store.issue_credentials(name, token), as_json)


@tenants.command("list")
@json_option
def tenants_list(as_json: bool) -> None:
    """All tenants with their quotas and queued/running counts."""
    _show_tenants(_store().list_tenants(), as_json)


@tenants.command("set-quota")
@click.argument("name")
@click.option("--weight", type=float)
@click.option("--max-queued", type=int)
@click.option("--max-running", type=int)
@json_option
def tenants_set_quota(name: str, weight: Optional[float], max_queued: Optional[int], max_running: Optional[int],
                      as_json: bool) -> None:
    """Change a tenant's weight and quotas (options left out stay as they are)."""
    _show_tenants([_store().set_quota(name, weight, max_queued, max_running)], as_json)


@tenants.command("rotate-token")
@click.argument("name")
@json_option
def tenants_rotate_token(name: str, as_json: bool) -> None:
    """Replace a tenant's token and broker password; the old ones stop working at once."""
    store = _store()
    token = store.rotate_token(name)
    _show_credentials(store.get_tenant(name), store.issue_credentials(name, token), as_json)


@tenants.command("disable")
@click.argument("name")
@json_option
def tenants_disable(name: str, as_json: bool) -> None:
    """Refuse the tenant's token and broker user at once; its queued jobs never start (running ones run on)."""
    _show_tenants([_store().set_disabled(name)], as_json)


@tenants.command("enable")
@click.argument("name")
@json_option
def tenants_enable(name: str, as_json: bool) -> None:
    """Accept a disabled tenant's token and broker user again."""
    _show_tenants([_store().set_disabled(name, False)], as_json)


# ---- jobs ----


@main.command()
@click.argument("spec_file", type=click.Path(dir_okay=False, allow_dash=True))
@token_option
@json_option
def submit(spec_file: str, token: Optional[str], as_json: bool) -> None:
    """Submit a job spec (a JSON file, or - for stdin) through the Celery API."""
    if not token:
        raise click.ClickException("submit needs a tenant token: --token or LORAFLEET_TOKEN")
    raw = click.get_binary_stream("stdin").read() if spec_file == "-" else _read_file(spec_file)
    parse_spec(raw)  # syntax and bounds here; the worker checks data paths and the base model
    job = _tenant_client(token).submit(json.loads(raw))
    _show_jobs([job], as_json, title="submitted")


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from None


@main.group()
def jobs() -> None:
    """Inspect and cancel jobs: a tenant's with --token, all of them with operator (Redis) access."""


@jobs.command("list")
@click.option("--state", type=click.Choice(keys.JOB_STATES))
@click.option("--limit", default=100, show_default=True)
@click.option("--tenant", help="operator only: one tenant's jobs")
@token_option
@json_option
def jobs_list(state: Optional[str], limit: int, tenant: Optional[str], token: Optional[str], as_json: bool) -> None:
    """Jobs, newest first."""
    api = _api(token)
    if tenant and token:
        raise click.ClickException("--tenant is for operators; a token already selects its tenant")
    found = api.list(state, limit, tenant) if tenant else api.list(state, limit)
    _show_jobs(found, as_json)


@jobs.command("purge")
@click.option("--older-than", "older_than", default="30d", show_default=True,
              help="finished longer ago than this: a number with s, m, h or d")
@click.option("--dry-run", is_flag=True, help="list what would be removed, remove nothing")
@json_option
def jobs_purge(older_than: str, dry_run: bool, as_json: bool) -> None:
    """Operator: remove finished jobs (record, events, artifacts) that finished before --older-than ago."""
    cutoff = time.time() - _seconds(older_than)
    store = _store()
    if dry_run:
        found = [record.view(with_spec=False) for record in store.jobs(store.finished_before(cutoff))]
    else:
        artifacts = ArtifactStore(config.artifact_root())
        found = []
        while batch := store.purge(cutoff, lambda job: artifacts.delete_job(job.tenant, job.job_id)):
            found += [record.view(with_spec=False) for record in batch]
    if as_json:
        _print_json({"dry_run": dry_run, "cutoff": cutoff, "jobs": found})
        return
    verb = "would remove" if dry_run else "removed"
    console().print(f"{verb} {len(found)} jobs finished before {_time(cutoff)}")
    if found:
        _show_jobs(found, False, title=f"{verb}")


def _seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:]
    try:
        if unit not in units or float(number) < 0:
            raise ValueError
        return float(number) * units[unit]
    except ValueError:
        raise click.BadParameter(f"{text!r}: use a number and a unit, e.g. 90s, 30m, 12h, 7d") from None


@jobs.command("show")
@click.argument("job_id")
@token_option
@json_option
def jobs_show(job_id: str, token: Optional[str], as_json: bool) -> None:
    """One job: state, progress, latest metrics, error, adapter location."""
    _show_job(_api(token).get(job_id), as_json)


@jobs.command("cancel")
@click.argument("job_id")
@token_option
@json_option
def jobs_cancel(job_id: str, token: Optional[str], as_json: bool) -> None:
    """Cancel a job (a running one is dropped by its executor within a step)."""
    _show_job(_api(token).cancel(job_id), as_json)


def _show_events(events: list[dict], as_json: bool) -> None:
    if as_json:
        _print_json(events)
        return
    rows = []
    for event in events:
        detail = {k: v for k, v in event.items() if k not in ("id", "type", "ts")}
        text = json.dumps(detail, sort_keys=True)
        if event["type"] == eval_samples.EVENT:  # prompt -> completion, a line each
            text = eval_samples.describe(event)
        rows.append([event["id"], _time(event["ts"]), event["type"], text])
    _table("events", ("id", "time", "type", "data"), rows)


@jobs.command("events")
@click.argument("job_id")
@click.option("--after", help="only events after this event id")
@click.option("--limit", default=100, show_default=True)
@token_option
@json_option
def jobs_events(job_id: str, after: Optional[str], limit: int, token: Optional[str], as_json: bool) -> None:
    """A job's events, oldest first: state changes, step metrics, errors."""
    _show_events(_api(token).events(job_id, after, limit), as_json)


@jobs.command("watch")
@click.argument("job_id")
@click.option("--interval", default=1.0, show_default=True, help="seconds between polls")
@token_option
@json_option
def jobs_watch(job_id: str, interval: float, token: Optional[str], as_json: bool) -> None:
    """Follow a job until it finishes: a progress bar with the latest loss (--json: one event per line)."""
    api = _api(token)
    job = api.get(job_id)
    after = None
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn())
    with Progress(*columns, console=console(), disable=as_json) as bar:
        task = bar.add_task(f"{job_id} {job['state']}", total=job["progress"]["total_steps"] or None, loss="-")
        while True:
            job = api.get(job_id)  # before the events: a job seen finished has its last events already written
            for event in api.events(job_id, after, 1000):
                after = event["id"]
                if as_json:
                    click.echo(json.dumps(event, sort_keys=True))
            loss = job["metrics"].get("loss")
            bar.update(
                task, description=f"{job_id} {job['state']}", completed=job["progress"]["step"],
                total=job["progress"]["total_steps"] or None, loss=f"{loss:.4f}" if loss is not None else "-",
            )
            if job["state"] in keys.TERMINAL_STATES:
                break
            time.sleep(interval)
    if not as_json:
        _show_job(job, False)


@main.command()
@click.argument("adapter")
@click.option("--base", "base_dir", required=True, type=click.Path(path_type=Path),
              help="the base model directory the adapter was trained on")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="the merged model's directory (new or empty)")
@click.option("--device", default="cpu", show_default=True, help="where to merge: cpu or cuda:N")
@token_option
@json_option
def merge(adapter: str, base_dir: Path, out_dir: Path, device: str, token: Optional[str], as_json: bool) -> None:
    """Merge an adapter into its base: a full model for servers that take no adapter (vLLM refuses DoRA).

    ADAPTER is an exported adapter's directory, or the id of a finished job, whose adapter is fetched from the
    artifact store. Needs the 'executor' extra (torch, PEFT)."""
    try:
        from lorafleet.executor.merge import MergeError, merge_adapter  # torch: only in this command
    except ImportError as exc:
        raise click.ClickException(f"merge needs the 'executor' extra (pip install 'lorafleet[executor]'): {exc}")
    with tempfile.TemporaryDirectory(prefix="lorafleet-merge-") as scratch:  # a fetched adapter's copy
        try:
            result = merge_adapter(_adapter_dir(adapter, token, Path(scratch)), base_dir, out_dir, device)
        except MergeError as exc:
            raise click.ClickException(_one_line(exc)) from None
    if as_json:
        _print_json(result.to_json())
    else:
        console().print(f"merged {result.adapter_type} adapter ({result.layers} layers) into {result.output} "
                        f"({result.dtype})")


def _adapter_dir(adapter: str, token: Optional[str], scratch: Path) -> Path:
    """A path names the adapter's directory; anything else is a job id, whose exported adapter is fetched (into
    `scratch` when the artifact store is not local)."""
    if "/" in adapter or Path(adapter).exists():
        return Path(adapter)
    job = _api(token).get(adapter)
    if not job.get("adapter_uri"):
        raise click.ClickException(f"job {adapter} has no exported adapter (state {job['state']}); merge a "
                                   "succeeded job's")
    return ArtifactStore(config.artifact_root()).fetch(job["adapter_uri"], scratch)


if __name__ == "__main__":
    main()
