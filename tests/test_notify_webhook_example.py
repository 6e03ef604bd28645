"""examples/notify_webhook.py against a webhook server on 127.0.0.1 that the test starts:
a real escalation, through a real ``python -m escalate`` process, posts one message; a
webhook answering 500 is a recorded, failed delivery."""

from __future__ import annotations

import os
import re
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
                 "Answer: `escalate pause r esc-3` | `escalate cancel r esc-3`"):
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
    zwsp = "\u200b"  # after formatting characters and colons (see the test below)
    assert slack[0].startswith(f"[normal] r: &lt;@U024BE7LH&gt; @{zwsp}here asks $3.00 for task "
                               f"big_{zwsp}job")
    assert slack[1] == (f"Reason: &lt;!channel&gt; see &lt;https:{zwsp}//evil.example|the runbook&gt; &amp; "
                        f"[docs](https:{zwsp}//evil.example) @{zwsp}everyone &lt;@&amp;123&gt; "
                        f"*{zwsp}*{zwsp}now*{zwsp}*{zwsp} ||x||")
    assert discord[0].startswith(r"[normal] r: \<\@U024BE7LH\> \@here asks $3.00 for task big\_job")
    assert discord[1] == (rf"Reason: \<!channel\> see \<https:{zwsp}//evil.example\|the runbook\> & "
                          rf"\[docs\]\(https:{zwsp}//evil.example\) \@everyone \<\@&123\> "
                          r"\*\*now\*\* \|\|x\|\|")
    # The commands to answer, as the notice carries them, in code spans.
    assert slack[2] == ("Answer: `escalate approve r esc-2` | `escalate pause r esc-2` | "
                        "`escalate cancel r esc-2`")
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


def _post(webhook: Webhook, event: dict[str, Any]) -> dict[str, Any]:
    """What the example posts for a hand-made ``event``."""
    url = f"http://127.0.0.1:{webhook.server_port}/hooks/T0KEN"
    posted = subprocess.run([sys.executable, str(EXAMPLE)], input=orjson.dumps(event), capture_output=True,
                            env={**os.environ, "ESCALATE_WEBHOOK_URL": url}, timeout=60, check=False)
    assert posted.returncode == 0, posted.stderr
    [(_, body)] = webhook.posts
    return body


def test_formatting_and_emoji_codes_reach_the_chats_as_typed(webhook: Webhook) -> None:
    reason = "*APPROVE NOW* _boss said_ ~ok~ `code` :tada:"
    event = {"run": "r:tada:", "id": "esc-1", "task": "t_1:fire:", "requested_by": "~boss~",
             "requested_micros": 1, "remaining_micros": 0, "request_reason": reason,
             "offered": ["extend", "pause"],
             "commands": {"approve": "escalate approve r:tada: esc-1",
                          "pause": "escalate pause r:tada: esc-1"}}
    body = _post(webhook, event)
    slack, discord = body["text"].splitlines(), body["content"].splitlines()
    zwsp = "\u200b"
    # Every formatting character, and every colon, of what was typed followed by a zero-width
    # space (Discord: markup behind a backslash too).
    assert re.search(f"[*_~`:](?!{zwsp})", slack[1].removeprefix("Reason: ")) is None, slack[1]
    rest = discord[1].removeprefix("Reason: ")
    assert re.search(f":(?!{zwsp})", rest) is None and re.search(r"(?<!\\)[*_~`]", rest) is None, rest
    for part in (f"r:{zwsp}tada:{zwsp}", f"t_{zwsp}1:{zwsp}fire:{zwsp}", f"~{zwsp}boss~{zwsp}"):
        assert part in slack[0], (part, slack[0])
    for part in (f"r:{zwsp}tada:{zwsp}", rf"t\_1:{zwsp}fire:{zwsp}", r"\~boss\~"):
        assert part in discord[0], (part, discord[0])
    # Take the zero-width spaces (and Discord's backslashes) away: what was typed, nothing else.
    assert slack[1].replace(zwsp, "") == f"Reason: {reason}"
    assert re.sub(r"\\(.)", r"\1", discord[1].replace(zwsp, "")) == f"Reason: {reason}"
    assert slack[0].replace(zwsp, "").startswith("[normal] r:tada:: ~boss~ asks $0.000001 for task t_1:fire:")
    # The commands to answer are code spans, to copy as they are: no invisible character in them.
    for text in (slack[2], discord[2]):
        assert text == "Answer: `escalate approve r:tada: esc-1` | `escalate pause r:tada: esc-1`"


def test_the_commands_of_a_notice_reach_the_chats_as_code(webhook: Webhook) -> None:
    # A hand-made notice (escalate writes no such command): markup in one must not act, and
    # it stays on one line.
    event = {"run": "r", "id": "esc-1", "task": "t", "requested_micros": 1, "remaining_micros": 0,
             "offered": ["pause"], "commands": {"pause": "escalate pause r_1 esc-1\n<!channel> `x` [x](y)"}}
    body = _post(webhook, event)
    assert body["text"].splitlines()[-1] == "Answer: `escalate pause r_1 esc-1 &lt;!channel&gt; 'x' [x](y)`"
    assert body["content"].splitlines()[-1] == "Answer: `escalate pause r_1 esc-1 <!channel> 'x' [x](y)`"
