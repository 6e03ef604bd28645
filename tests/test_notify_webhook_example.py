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
                 "Answer: escalate pause r esc-3 | escalate cancel r esc-3"):
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


def test_what_the_requester_typed_reaches_the_chats_as_typed(tmp_path: Path, webhook: Webhook) -> None:
    runs = tmp_path / "runs"
    url = f"http://127.0.0.1:{webhook.server_port}/hooks/T0KEN"
    requester = "<@U024BE7LH> @here"
    reason = ("<!channel> see <https://evil.example|the runbook> & [docs](https://evil.example) "
              "@everyone <@&123> **now** ||x||")
    assert escalate(runs, "runs", "init", "r", "--cap", "10", "--escalation", "enforce",
                    "--approval-threshold", "2").returncode == 0
    asked = escalate(runs, "reserve", "r", "big_job", "--estimate", "3", "--reason", reason,
                     ESCALATE_ACTOR=requester, ESCALATE_WEBHOOK_URL=url,
                     ESCALATE_NOTIFY_CMD=f"{shlex.quote(sys.executable)} {shlex.quote(str(EXAMPLE))}")
    assert asked.returncode == 4 and "warning" not in asked.stderr, asked.stderr
    [(_, body)] = webhook.posts
    assert body["allowed_mentions"] == {"parse": []}  # Discord pings nobody, whatever the text
    slack, discord = body["text"].splitlines(), body["content"].splitlines()
    assert slack[0].startswith("[normal] r: &lt;@U024BE7LH&gt; @\u200bhere asks $3.00 for task big_job")
    assert slack[1] == ("Reason: &lt;!channel&gt; see &lt;https://evil.example|the runbook&gt; &amp; "
                        "[docs](https://evil.example) @\u200beveryone &lt;@&amp;123&gt; **now** ||x||")
    assert discord[0].startswith(r"[normal] r: \<\@U024BE7LH\> \@here asks $3.00 for task big\_job")
    assert discord[1] == (r"Reason: \<!channel\> see \<https://evil.example\|the runbook\> & "
                          r"\[docs\]\(https://evil.example\) \@everyone \<\@&123\> \*\*now\*\* \|\|x\|\|")
    # The commands to answer, as the notice carries them, escaped as every other value.
    assert slack[2] == "Answer: escalate approve r esc-2 | escalate pause r esc-2 | escalate cancel r esc-2"
    assert discord[2] == slack[2]


def test_a_value_never_starts_a_line_of_its_own(webhook: Webhook) -> None:
    # A hand-made event (escalate refuses such a reason): a newline must not open a heading.
    event = {"run": "r", "id": "esc-1", "task": "t", "requested_micros": 1, "remaining_micros": 0,
             "request_reason": "ok\n# ALL HANDS\r\n> quoted\u2028-# small", "offered": ["pause"]}
    url = f"http://127.0.0.1:{webhook.server_port}/hooks/T0KEN"
    posted = subprocess.run([sys.executable, str(EXAMPLE)], input=orjson.dumps(event), capture_output=True,
                            env={**os.environ, "ESCALATE_WEBHOOK_URL": url}, timeout=60, check=False)
    assert posted.returncode == 0, posted.stderr
    [(_, body)] = webhook.posts
    assert body["text"].splitlines()[1] == "Reason: ok # ALL HANDS &gt; quoted -# small"
    assert body["content"].splitlines()[1] == r"Reason: ok # ALL HANDS \> quoted -# small"


def test_the_commands_of_a_notice_are_escaped_as_every_value(webhook: Webhook) -> None:
    # A hand-made notice (escalate writes no such command): markup in one must not act.
    event = {"run": "r", "id": "esc-1", "task": "t", "requested_micros": 1, "remaining_micros": 0,
             "offered": ["pause"], "commands": {"pause": "escalate pause r_1 esc-1\n<!channel> @here [x](y)"}}
    url = f"http://127.0.0.1:{webhook.server_port}/hooks/T0KEN"
    posted = subprocess.run([sys.executable, str(EXAMPLE)], input=orjson.dumps(event), capture_output=True,
                            env={**os.environ, "ESCALATE_WEBHOOK_URL": url}, timeout=60, check=False)
    assert posted.returncode == 0, posted.stderr
    [(_, body)] = webhook.posts
    assert body["text"].splitlines()[-1] == \
        "Answer: escalate pause r_1 esc-1 &lt;!channel&gt; @\u200bhere [x](y)"
    assert body["content"].splitlines()[-1] == \
        r"Answer: escalate pause r\_1 esc-1 \<!channel\> \@here \[x\]\(y\)"
