#!/usr/bin/env python3
"""A notify hook that posts each escalation to a Slack- or Discord-compatible incoming
webhook. Standard library only: copy it anywhere escalate runs.

    export ESCALATE_WEBHOOK_URL=https://hooks.slack.com/services/T…   # or a Discord webhook
    export ESCALATE_NOTIFY_CMD="python3 /path/to/notify_webhook.py"

escalate runs it with the escalation event as one JSON object on stdin, after the run's
lock is released. It posts ``{"text": …, "content": …}`` (Slack reads ``text``, Discord
``content``) and exits 0 on a 2xx answer, 1 otherwise, so escalate records a failed
delivery and ``escalate sweep`` sends it again. It never prints the URL: it holds a token.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

TIMEOUT_S = 5


def usd(micros: int) -> str:
    """Exact, as escalate shows money: ``$4.50``, ``$5.000001`` (never rounded)."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), 1_000_000)
    return f"{sign}${whole:,}." + f"{fraction:06d}".rstrip("0").ljust(2, "0")


def message(event: dict[str, Any]) -> str:
    """One chat message: who asks for what and why, how urgent, and the commands to answer."""
    run, escalation_id = event["run"], event["id"]
    asked = event["requested_micros"]
    lines = [
        f"[{event.get('priority', 'normal')}] {run}: {event.get('requested_by') or 'someone'} asks "
        f"{usd(asked)} for task {event['task']} ({event.get('kind', 'reserve')}); "
        f"{usd(event['remaining_micros'])} left"
        + (f", needs a {usd(event['needed_extension_micros'])} extension"
           if event.get("needed_extension_micros") else "") + ".",
    ]
    if event.get("request_reason"):
        lines.append(f"Reason: {event['request_reason']}")
    if event.get("attempt", 1) > 1:
        lines.append(f"(reminder {event['attempt']})")
    offered = event.get("offered", [])
    commands = {"extend": "approve", "pause": "pause", "cancel": "cancel"}
    lines.append("Answer: " + " | ".join(f"escalate {commands[mode]} {run} {escalation_id} --by YOU"
                                         for mode in offered if mode in commands))
    if event.get("expires_at"):
        lines.append(f"Paused by timeout at {event['expires_at']} if nobody answers.")
    return "\n".join(lines)


def main() -> int:
    url = os.environ.get("ESCALATE_WEBHOOK_URL", "")
    if not url.startswith(("https://", "http://")):
        print("notify_webhook: set ESCALATE_WEBHOOK_URL to the webhook's https:// URL", file=sys.stderr)
        return 2
    text = message(json.load(sys.stdin))
    body = json.dumps({"text": text, "content": text}).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:
            answer.read()
    except urllib.error.HTTPError as error:
        print(f"notify_webhook: the webhook answered {error.code}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        print(f"notify_webhook: could not reach the webhook ({reason})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
