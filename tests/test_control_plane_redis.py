"""The embedded Redis as `lorafleet redis` runs it: loopback only, password required, AOF everysec, clean stop."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys

import pytest
import redis


def test_lorafleet_redis_command(tmp_path):
    data_dir = tmp_path / "redis"
    process = subprocess.Popen(
        [sys.executable, "-P", "-m", "lorafleet.scheduler.cli", "redis", "--dir", str(data_dir), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = []
        while not lines or lines[-1] != "}":
            line = process.stdout.readline()
            assert line, process.stderr.read()
            lines.append(line.rstrip("\n"))
        info = json.loads("\n".join(lines))
        url_file = data_dir / "redis.url"
        assert url_file.read_text() == info["url"]
        assert stat.S_IMODE(url_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((data_dir / "credentials.json").stat().st_mode) == 0o600
        assert set(info["role_urls"]) == {"worker", "scheduler", "executor", "gateway"}

        client = redis.Redis.from_url(info["url"], decode_responses=True)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("appendfsync")["appendfsync"] == "everysec"
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("dir")["dir"] == str(data_dir)
        port = client.connection_pool.connection_kwargs["port"]
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port).ping()
        client.set("probe", "1")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    assert not url_file.exists()
    assert any(b"probe" in part.read_bytes() for part in (data_dir / "appendonlydir").glob("*.aof"))  # multi-part AOF
