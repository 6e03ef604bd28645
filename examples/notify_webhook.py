#!/usr/bin/env python3
"""A notify hook that posts each escalation to a Slack- or Discord-compatible incoming
webhook. Standard library only: copy it anywhere escalate runs.

    export ESCALATE_WEBHOOK_URL=https://hooks.slack.com/services/T…   # or a Discord webhook
    export ESCALATE_NOTIFY_CMD="python3 /path/to/notify_webhook.py"

escalate runs it with the escalation event as one JSON object on stdin, after the run's
lock is released. It posts ``{"text": …, "content": …, "allowed_mentions": {"parse": []}}``
(Slack reads ``text``, Discord ``content``) and exits 0 on a 2xx answer, 1 otherwise, so
escalate records a failed delivery and ``escalate sweep`` sends it again. It never prints
the URL: it holds a token.

Reasons, names and ids are whatever the requester typed: each chat gets them escaped so that
they show as typed and never act as markup — no ``<!channel>`` or ``@everyone`` ping, no
``<https://…|text>`` or ``[text](https://…)`` link under other words, no formatting
(``*bold*``, ``_italic_``, ``~strike~``, backquotes) and no ``:emoji:``, and newlines folded
into spaces so no value starts a line of its own. The commands to answer are code spans,
to copy as they are.
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

TIMEOUT_S = 5


def usd(micros: int) -> str:
    """Exact, as escalate shows money: ``$4.50``, ``$5.000001`` (never rounded)."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), 1_000_000)
    return f"{sign}${whole:,}." + f"{fraction:06d}".rstrip("0").ljust(2, "0")


def one_line(value: object) -> str:
    """``value`` as text on one line: control characters and runs of white space (newlines
    too) become one space."""
    text = "".join(char if char.isprintable() else " " for char in str(value))
    return " ".join(text.split())


# Mentions that ping a whole channel when a chat reads them as plain words.
MASS_MENTION = re.compile(r"@(?=(?:everyone|here|channel)\b)", re.IGNORECASE)
SLACK_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
# Discord's markdown and mention syntax: **bold**, __, ~~, `code`, ||spoiler||, > quotes,
# [text](url) links, <@user>, <@&role>, <#channel>, <t:…> and @everyone; a backslash shows
# each as typed.
DISCORD_MARKUP = re.compile(r"([\\*_~`|<>\[\]()@])")
# Slack's formatting (*bold*, _italic_, ~strike~, `code`) and both chats' :emoji: codes: a
# zero-width space after each of these characters keeps it as typed (a backslash does not:
# Slack shows it, and Discord still draws the emoji).
SLACK_MARKUP = re.compile(r"([*_~`:])")
ZERO_WIDTH_SPACE = "\u200b"


def slack(value: object) -> str:
    """``value`` for Slack's ``text``: ``&``, ``<`` and ``>`` as the entities Slack asks for
    (so ``<!channel>``, ``<@U…>`` and ``<https://…|text>`` stay plain text); a mass mention,
    formatting (``*``, ``_``, ``~``, backquotes) and ``:emoji:`` broken by a zero-width space."""
    text = "".join(SLACK_ENTITIES.get(char, char) for char in one_line(value))
    return SLACK_MARKUP.sub(r"\1" + ZERO_WIDTH_SPACE, MASS_MENTION.sub("@" + ZERO_WIDTH_SPACE, text))


def discord(value: object) -> str:
    """``value`` for Discord's ``content``: every markdown and mention character after a
    backslash, which Discord shows as the character itself; ``:emoji:`` broken by a
    zero-width space."""
    return DISCORD_MARKUP.sub(r"\\\1", one_line(value)).replace(":", ":" + ZERO_WIDTH_SPACE)


def command(text: str, quote: Callable[[object], str]) -> str:
    """A command to copy, in a code span: shown as typed in both chats (no formatting, no
    emoji) with nothing invisible added. Ids hold no backquote; a hand-made event's is
    replaced, so the span cannot close early."""
    text = one_line(text).replace("`", "'")
    if quote is slack:
        text = "".join(SLACK_ENTITIES.get(char, char) for char in text)
    return f"`{text}`"


def message(event: dict[str, Any], quote: Callable[[object], str]) -> str:
    """One chat message: who asks for what and why, how urgent, and the commands to answer;
    every value from the event passed through ``quote`` (:func:`slack` or :func:`discord`),
    the commands in code spans (:func:`command`)."""
    run = quote(event["run"])
    asked = event["requested_micros"]
    lines = [
        f"[{quote(event.get('priority', 'normal'))}] {run}: {quote(event.get('requested_by') or 'someone')} "
        f"asks {usd(asked)} for task {quote(event['task'])} ({quote(event.get('kind', 'reserve'))}); "
        f"{usd(event['remaining_micros'])} left"
        + (f", needs a {usd(event['needed_extension_micros'])} extension"
           if event.get("needed_extension_micros") else "") + ".",
    ]
    if event.get("request_reason"):
        lines.append(f"Reason: {quote(event['request_reason'])}")
    if event.get("attempt", 1) > 1:
        lines.append(f"(reminder {quote(event['attempt'])})")
    # The exact commands that answer it, as the notice carries them (approve only when an
    # approval is offered); the approver's name and store come from their own environment.
    commands = event.get("commands") or {}
    if commands:
        lines.append("Answer: " + " | ".join(command(text, quote) for text in commands.values()))
    if event.get("expires_at"):
        lines.append(f"Paused by timeout at {quote(event['expires_at'])} if nobody answers.")
    return "\n".join(lines)


def main() -> int:
    url = os.environ.get("ESCALATE_WEBHOOK_URL", "")
    if not url.startswith(("https://", "http://")):
        print("notify_webhook: set ESCALATE_WEBHOOK_URL to the webhook's https:// URL", file=sys.stderr)
        return 2
    event = json.load(sys.stdin)
    # One body for both chats; allowed_mentions makes Discord ping nobody whatever the text.
    body = json.dumps({"text": message(event, slack), "content": message(event, discord),
                       "allowed_mentions": {"parse": []}}).encode()
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
