"""Least-privilege Redis users: one per service role, one broker user per tenant (Redis/Valkey ACLs, 7.0 or newer).

| user | keys | channels | commands |
|---|---|---|---|
| `lorafleet-operator` | all | all | all: the only user that may run admin commands; the CLI's admin commands use it |
| `lorafleet-worker` | `lorafleet:*`, tenant queues and results, kombu's own keys | all (Celery's result notifications, remote control) | data commands: no admin, none of `@dangerous`, no SCAN |
| `lorafleet-scheduler` | `lorafleet:*` | none | data commands and scripts: no admin, none of `@dangerous`, no SCAN, no pub/sub |
| `lorafleet-executor` | `lorafleet:*` | none | the same as the scheduler |
| `tenant.<name>` | its own queue and kombu routing set; its own results read-only | its own results | only LPUSH/LLEN/SADD/SMEMBERS to publish, GET/MGET/SUBSCRIBE to fetch results |

The `default` user is off. Rules are applied with `ACL SETUSER ... reset` (so re-applying one replaces it whole) and
saved with `ACL SAVE` where the server has an ACL file (the embedded one does), so a restart keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import quote, urlparse

import redis

from lorafleet.scheduler import keys

ROLES = ("operator", "worker", "scheduler", "executor", "gateway")
TENANT_USER_PREFIX = "tenant."

# Everything a service may not run: admin commands (CONFIG, MODULE, DEBUG, SAVE, MONITOR, ACL, ...), the dangerous
# ones (FLUSH*, KEYS, SHUTDOWN, ...), and SCAN, which lists key names outside a user's key patterns.
_SERVICE_COMMANDS = ("+@all", "-@admin", "-@dangerous", "-scan", "+client|setinfo", "+client|setname")
_STORE_KEYS = (f"~{keys.PREFIX}*",)

ROLE_RULES: dict[str, tuple[str, ...]] = {
    "operator": ("~*", "&*", "+@all"),
    "worker": _STORE_KEYS + (f"~{keys.TENANT_KEY_PREFIX}*", "~_kombu.*", "~unacked*", "~*.celery.pidbox*", "&*")
    + _SERVICE_COMMANDS,
    "scheduler": _STORE_KEYS + _SERVICE_COMMANDS + ("-@pubsub",),
    "executor": _STORE_KEYS + _SERVICE_COMMANDS + ("-@pubsub",),
    "gateway": _STORE_KEYS + _SERVICE_COMMANDS + ("-@pubsub",),  # the HTTP API: the store only, no broker
}

# What Celery's client runs to publish a task (kombu declares the queue: LLEN of each priority sub-queue, SADD of
# the routing set; then SMEMBERS and LPUSH) and to fetch its result (SUBSCRIBE, GET/MGET).
_TENANT_COMMANDS = ("-@all", "+lpush", "+llen", "+sadd", "+smembers", "+get", "+mget", "+subscribe", "+unsubscribe",
                    "+ping", "+multi", "+exec", "+discard", "+client|setinfo", "+client|setname")


def username(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    return f"lorafleet-{role}"


def tenant_username(tenant: str) -> str:
    return TENANT_USER_PREFIX + tenant


def tenant_rules(tenant: str) -> tuple[str, ...]:
    queue, results = keys.tenant_queue(tenant), keys.tenant_result_prefix(tenant)
    return _TENANT_COMMANDS + (
        f"~{queue}*",  # the queue and kombu's priority sub-queues; tenant names hold no '.', so no other tenant's
        f"~_kombu.binding.{queue}", f"~_kombu.binding_permanent.{queue}",
        f"%R~{results}*", f"&{results}*",
    )


def _set_user(client: redis.Redis, name: str, password: str, rules: tuple[str, ...], enabled: bool = True) -> None:
    client.execute_command("ACL", "SETUSER", name, "reset", "on" if enabled else "off", f">{password}", *rules)


def save(client: redis.Redis) -> bool:
    """Persist the users where the server has an ACL file; False (and nothing persisted) where it has none."""
    try:
        client.execute_command("ACL", "SAVE")
        return True
    except redis.ResponseError as exc:
        if "ACL file" in str(exc) or "aclfile" in str(exc).lower():
            return False
        raise


def apply_roles(client: redis.Redis, passwords: dict[str, str]) -> None:
    """Create or refresh the service users (`passwords`: role -> password) and turn the default user off."""
    for role in ROLES:
        if role in passwords:
            _set_user(client, username(role), passwords[role], ROLE_RULES[role])
    client.execute_command("ACL", "SETUSER", "default", "off")
    save(client)


def set_tenant_user(client: redis.Redis, tenant: str, password: str, enabled: bool = True) -> None:
    """Create the tenant's broker user, or replace its password (which disconnects nobody: `close_connections`)."""
    _set_user(client, tenant_username(tenant), password, tenant_rules(tenant), enabled)
    save(client)


def close_connections(client: redis.Redis, tenant: str) -> None:
    """Close the tenant's open connections (a changed password or a user turned off leaves them authenticated)."""
    try:
        client.execute_command("CLIENT", "KILL", "USER", tenant_username(tenant))
    except redis.ResponseError as exc:
        if "no such user" not in str(exc).lower():
            raise


def revoke_tenant(client: redis.Redis, tenant: str) -> None:
    """Turn the tenant's broker user off and close its open connections at once."""
    client.execute_command("ACL", "SETUSER", tenant_username(tenant), "off")
    close_connections(client, tenant)
    save(client)


def enable_tenant(client: redis.Redis, tenant: str) -> None:
    client.execute_command("ACL", "SETUSER", tenant_username(tenant), "on")
    save(client)


def url_for(base_url: str, user: str, password: str) -> str:
    """`base_url` (any credentials dropped) with `user:password` in it."""
    parsed = urlparse(base_url)
    host = parsed.hostname or "127.0.0.1"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}" + (f":{parsed.port}" if parsed.port else "")
    return parsed._replace(netloc=netloc).geturl()


def tenant_of_url(url: str) -> Optional[str]:
    """The tenant a broker URL belongs to (its user name), else None."""
    user = urlparse(url).username or ""
    return user[len(TENANT_USER_PREFIX):] if user.startswith(TENANT_USER_PREFIX) else None


def tenant_celery_config(tenant: str) -> dict[str, Any]:
    """The two Celery settings a tenant's app needs: its queue, and the prefix its results are written under."""
    return {
        "task_default_queue": keys.tenant_queue(tenant),
        "result_backend_transport_options": {"global_keyprefix": keys.tenant_result_prefix(tenant)},
    }


@dataclass(frozen=True)
class TenantCredentials:
    """Everything a tenant holds: the API token, its own broker user's URL, and its Celery settings."""

    tenant: str
    token: str
    broker_url: str

    def to_json(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "token": self.token, "broker_url": self.broker_url,
                "celery_config": tenant_celery_config(self.tenant)}
