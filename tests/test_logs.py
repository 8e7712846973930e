"""Log lines: text by default, one JSON object per line with LORAFLEET_LOG_FORMAT=json or `lorafleet --log-format
json`, in every process; a wrong format is one error line naming the variable."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from helpers_polling import wait_until
from lorafleet.scheduler.logs import JsonFormatter
from lorafleet.scheduler.redis_server import start_redis_server


def test_a_json_line_carries_the_fields_the_extra_and_the_traceback():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("lorafleet.scheduler", logging.WARNING, __file__, 1, "job %s requeued",
                                   ("job-1",), sys.exc_info())
    record.job_id = "job-1"
    line = json.loads(JsonFormatter("scheduler").format(record))
    assert line["message"] == "job job-1 requeued" and line["level"] == "WARNING"
    assert line["component"] == "scheduler" and line["logger"] == "lorafleet.scheduler"
    assert line["job_id"] == "job-1" and "RuntimeError: boom" in line["exc_info"]
    assert line["ts"].endswith("+00:00")


def run_scheduler(tmp_path, *cli: str, env: dict[str, str]) -> subprocess.Popen:
    server = start_redis_server(tmp_path / "redis")
    return server, subprocess.Popen(
        [sys.executable, "-P", "-m", "lorafleet.scheduler.cli", *cli, "scheduler", "--metrics-port", "0",
         "--interval", "0.2"], env={**os.environ, "REDIS_URL": server.url, **env}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def test_every_line_of_a_scheduler_started_with_log_format_json_is_json(tmp_path):
    server, process = run_scheduler(tmp_path, "--log-format", "json", env={})
    lines = []
    try:
        wait_until(lambda: lines.append(process.stdout.readline()) or "leader" in lines[-1], "the leader line", 60)
    finally:
        process.terminate()
        lines += process.communicate(timeout=30)[0].splitlines()
        server.stop()
    parsed = [json.loads(line) for line in lines if line.strip()]
    assert parsed and all(entry["component"] == "scheduler" for entry in parsed)
    assert any("is now the leader" in entry["message"] for entry in parsed)


def test_an_unknown_log_format_is_one_error_line_naming_the_variable(tmp_path):
    server, process = run_scheduler(tmp_path, env={"LORAFLEET_LOG_FORMAT": "xml"})
    try:
        output = process.communicate(timeout=60)[0]
    finally:
        server.stop()
    assert process.returncode != 0
    assert output.strip().splitlines() == ["Error: LORAFLEET_LOG_FORMAT='xml': expected one of text, json"]
