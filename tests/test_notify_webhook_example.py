"""examples/notify_webhook.py against a webhook server on 127.0.0.1 that the test starts:
a real escalation, through a real ``python -m escalate`` process, posts one message; a
webhook answering 500 is a recorded, failed delivery."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

EXAMPLE = Path(__file__).parent.parent / "examples" / "notify_webhook.py"


class Webhook(HTTPServer):
    answer = 200
    posts: list[tuple[str, dict[str, Any]]]


class _Handler(BaseHTTPRequestHandler):
    server: Webhook

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts.append((self.path, orjson.loads(body)))
        self.send_response(self.server.answer)
        self.end_headers()

    def log_message(self, *args: Any) -> None:  # keep the test output clean
        pass


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    server = Webhook(("127.0.0.1", 0), _Handler)
    server.posts = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def escalate(runs_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key != "ESCALATE_NOTIFY_CMD"}
    environment.update({"ESCALATE_RUNS_DIR": str(runs_dir), "ESCALATE_ACTOR": "ci-bot", **env})
    return subprocess.run([sys.executable, "-m", "escalate", *args], capture_output=True, text=True,
                          env=environment, timeout=60, check=False)


def notified(runs_dir: Path) -> list[dict[str, Any]]:
    lines = (runs_dir / "r" / "events.ndjson").read_bytes().splitlines()
    return [e for e in map(orjson.loads, lines) if e["type"] == "escalation_notified"]


def test_the_example_posts_the_escalation(tmp_path: Path, webhook: Webhook) -> None:
    runs = tmp_path / "runs"
    url = f"http://127.0.0.1:{webhook.server_port}/hooks/T0KEN"
    hook = f"{shlex.quote(sys.executable)} {shlex.quote(str(EXAMPLE))}"
    assert escalate(runs, "runs", "init", "r", "--cap", "10", "--escalation", "enforce",
                    "--approval-threshold", "2", "--max-extension", "1").returncode == 0
    assert escalate(runs, "reserve", "r", "fill", "--estimate", "2").returncode == 0
    asked = escalate(runs, "reserve", "r", "gpu", "--estimate", "9.000001", "--reason", "fine-tune run",
                     "--priority", "urgent", "--notify-cmd", hook, ESCALATE_WEBHOOK_URL=url)
    assert asked.returncode == 4 and "warning" not in asked.stderr, asked.stderr
    [(path, body)] = webhook.posts
    assert path == "/hooks/T0KEN" and body["text"] == body["content"]
    text = body["text"]
    for part in ("[urgent] r: ci-bot asks $9.000001 for task gpu", "$8.00 left",
                 "needs a $1.000001 extension", "Reason: fine-tune run",
                 "escalate pause r esc-3 --by YOU", "escalate cancel r esc-3 --by YOU"):
        assert part in text, (part, text)
    assert "approve" not in text  # extend is not offered: $1.000001 is over the $1 max extension
    assert [(n["attempt"], n["ok"]) for n in notified(runs)] == [(1, True)]


def test_a_failing_webhook_is_a_recorded_failed_delivery(tmp_path: Path, webhook: Webhook) -> None:
    runs = tmp_path / "runs"
    webhook.answer = 500
    url = f"http://127.0.0.1:{webhook.server_port}/hooks/T0KEN"
    assert escalate(runs, "runs", "init", "r", "--cap", "10", "--escalation", "enforce",
                    "--approval-threshold", "2").returncode == 0
    asked = escalate(runs, "reserve", "r", "t", "--estimate", "3",
                     ESCALATE_NOTIFY_CMD=f"{shlex.quote(sys.executable)} {shlex.quote(str(EXAMPLE))}",
                     ESCALATE_WEBHOOK_URL=url)
    assert asked.returncode == 4
    assert "the webhook answered 500" in asked.stderr and "T0KEN" not in asked.stderr
    assert [(n["attempt"], n["ok"], n["detail"]) for n in notified(runs)] == [(1, False, "exit 1")]
    assert len(webhook.posts) == 1
