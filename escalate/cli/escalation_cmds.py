"""The approver's commands: approve, pause, cancel, wait, the inbox, and sweep."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from escalate.cli import (
    ByOption,
    JsonOption,
    LockTimeoutOption,
    NotifyOption,
    RunArg,
    RunsDirOption,
    StoreGroup,
    echo_line,
    open_ledger,
    open_options,
    respond,
)

if TYPE_CHECKING:
    from escalate.reports.inbox import EscalationView, InboxRow
    from escalate.reports.runs import SweepReport

EscalationArg = Annotated[str, typer.Argument(help="Escalation id, e.g. esc-12.", show_default=False,
                                              metavar="ESCALATION_ID")]


def _said(result: dict[str, Any]) -> None:
    if result.get("state") == "open":  # an approval short of its quorum: recorded, or again
        from escalate.reports.report import approvals_line

        again = "already counted; " if result["status"] == "exists" else ""
        names, quorum = result["approvals"], result["quorum"]
        echo_line(f"{result['escalation_id']}: {again}{approvals_line(names, quorum)}; it stays open "
                  f"until {quorum - len(names)} more approve")
        return
    if result["status"] == "exists":
        echo_line(f"{result['escalation_id']}: already resolved {result['mode']} by {result['by']}; "
                  "nothing changed")
        return
    extra = ""
    if result["status"] == "approved":
        extension = result.get("extension_micros", 0)
        from escalate.core.money import format_usd as usd

        pool_extension = result.get("pool_extension_micros", 0)
        extra = f": {usd(result['reserved_micros'])} reserved for {result['task']}" + (
            f", cap extended by {usd(extension)}" if extension else "") + (
            f", the pool extended by {usd(pool_extension)} for this period" if pool_extension else "")
    echo_line(f"{result['escalation_id']} {result['status']} by {result['by']}{extra}")


ApproverKeyOption = Annotated[list[str] | None, typer.Option(
    "--approver-key", metavar="NAME=KEY",
    help="Pin an approver's public SSH key, e.g. 'alice=ssh-ed25519 AAAA… alice@host' (repeatable; on "
    "set, the keys given replace the pinned ones, \"\" unpins all); every approve, pause and cancel must "
    "then be signed (--sign) by a key pinned for its --by.", show_default=False)]
SignOption = Annotated[Path | None, typer.Option(
    "--sign", metavar="KEYFILE",
    help="Sign the resolution with this private SSH key file, or with ssh-agent when KEYFILE is the "
    "key's .pub (needed when the policy pins approvers' keys).", show_default=False)]
ChangeSignOption = Annotated[Path | None, typer.Option(
    "--sign", metavar="KEYFILE",
    help="Sign the change with this private SSH key file, or with ssh-agent when KEYFILE is the key's "
    ".pub (needed while the policy pins approvers' keys: a key pinned for --by).", show_default=False)]


def _resolve(mode: str, run: str, escalation_id: str, runs_dir: Path | None, lock_timeout: str | None,
             by: str | None, json_out: bool, sign: Path | None = None) -> None:
    method = {"extend": "approve", "pause": "pause", "cancel": "cancel", "withdraw": "withdraw"}[mode]
    signing = {} if sign is None else {"sign": sign}
    respond(json_out,
            lambda: getattr(open_ledger(run, runs_dir, lock_timeout, by), method)(escalation_id, **signing),
            _said)


def approve(run: RunArg, escalation_id: EscalationArg, runs_dir: RunsDirOption = None,
            lock_timeout: LockTimeoutOption = None, by: ByOption = None, sign: SignOption = None,
            json_out: JsonOption = False) -> None:
    """Approve an escalation: extend the cap as needed and reserve for its task, in one write."""
    _resolve("extend", run, escalation_id, runs_dir, lock_timeout, by, json_out, sign)


def pause(run: RunArg, escalation_id: EscalationArg, runs_dir: RunsDirOption = None,
          lock_timeout: LockTimeoutOption = None, by: ByOption = None, sign: SignOption = None,
          json_out: JsonOption = False) -> None:
    """Pause an escalation: its task is parked and may ask again later."""
    _resolve("pause", run, escalation_id, runs_dir, lock_timeout, by, json_out, sign)


def cancel(run: RunArg, escalation_id: EscalationArg, runs_dir: RunsDirOption = None,
           lock_timeout: LockTimeoutOption = None, by: ByOption = None, sign: SignOption = None,
           json_out: JsonOption = False) -> None:
    """Cancel an escalation: its task is halted for good."""
    _resolve("cancel", run, escalation_id, runs_dir, lock_timeout, by, json_out, sign)


def withdraw(run: RunArg, escalation_id: EscalationArg, runs_dir: RunsDirOption = None,
             lock_timeout: LockTimeoutOption = None, by: ByOption = None,
             json_out: JsonOption = False) -> None:
    """Take back your own escalation: the task keeps what it holds and may ask again."""
    _resolve("withdraw", run, escalation_id, runs_dir, lock_timeout, by, json_out)


def wait(
    run: RunArg,
    escalation_id: EscalationArg,
    timeout: Annotated[str | None, typer.Option(
        "--timeout", metavar="DURATION",
        help="Give up after this long, e.g. 10m, at most 365d (exit 4) [default: wait until "
        "resolved].")] = None,
    runs_dir: RunsDirOption = None,
    lock_timeout: LockTimeoutOption = None,
    json_out: JsonOption = False,
) -> None:
    """Block until an escalation is resolved: exit 0 approved, 3 cancelled, 4 paused, withdrawn or
    still open."""

    def action() -> Mapping[str, Any]:
        from escalate.core.durations import MAX_WAIT_S, parse_duration

        seconds = None if timeout is None else parse_duration(timeout, what="timeout", maximum=MAX_WAIT_S)
        return open_ledger(run, runs_dir, lock_timeout).wait(escalation_id, timeout_s=seconds)

    respond(json_out, action, _said)


escalations_app = typer.Typer(invoke_without_command=True)


@escalations_app.callback(cls=StoreGroup)
def escalations(
    context: typer.Context,
    run: Annotated[str | None, typer.Option("--run", help="Only this run.", metavar="RUN")] = None,
    only_open: Annotated[bool, typer.Option("--open", help="Only escalations waiting for a person.")] = False,
    wide: Annotated[bool, typer.Option("--wide", help="One column per fact (age, what remained when asked, "
                                       "what is offered …), as wide as it takes.")] = False,
    runs_dir: RunsDirOption = None,
    json_out: JsonOption = False,
) -> None:
    """The approver's inbox: escalations across runs (shadow ones included unless --open),
    what each needs now, and the whole reason; 'escalations show RUN ID' shows one in full."""
    if context.invoked_subcommand is not None:
        return

    moment: list[datetime] = []  # now, by the store's clock: the ages and deadlines shown

    def action() -> dict[str, list[InboxRow]]:
        from escalate.config import utc_now
        from escalate.reports.inbox import inbox
        from escalate.reports.runs import opened_store

        with opened_store(open_options(runs_dir, None)["location"]) as store:
            found = inbox(store, run=run, open_only=only_open)
            # One broken run must not hide every other run's escalations from the approver.
            for skipped in found["skipped"]:
                print(f"escalate: warning: skipped {skipped['run']}: {skipped['message']}", file=sys.stderr)
            if not json_out:
                moment.append(store.now(utc_now))
        return {"escalations": found["escalations"]}

    def human(result: dict[str, list[InboxRow]]) -> None:
        from escalate.reports.render import escalation_table, print_whole

        print_whole(escalation_table(result["escalations"], now=moment[0], wide=wide,
                                     title="open escalations" if only_open else "escalations"))

    respond(json_out, action, human)


@escalations_app.command("show")
def show(run: RunArg, escalation_id: EscalationArg, runs_dir: RunsDirOption = None,
         json_out: JsonOption = False) -> None:
    """One escalation in full: the request, its reason and priority; who asked; what it needs
    now with the run's and the pool's money; its approvals; every notice attempt; and the
    commands that answer it."""
    moment: list[datetime] = []

    def action() -> EscalationView:
        from escalate.config import utc_now
        from escalate.reports.inbox import escalation_view
        from escalate.reports.runs import opened_store

        with opened_store(open_options(runs_dir, None)["location"]) as store:
            view = escalation_view(store, run, escalation_id)
            moment.append(store.now(utc_now))
        return view

    def human(view: EscalationView) -> None:
        from escalate.reports.render import escalation_panel, print_whole

        print_whole(escalation_panel(view, now=moment[0]))

    respond(json_out, action, human)


def sweep(
    run: Annotated[str | None, typer.Argument(help="Run id [default: every run].", metavar="[RUN]")] = None,
    runs_dir: RunsDirOption = None,
    lock_timeout: LockTimeoutOption = None,
    notify_cmd: NotifyOption = None,
    parallel: Annotated[int | None, typer.Option("--parallel", metavar="N", help="Notify hooks run at "
                                                 "once (1-32) [default: 4].")] = None,
    deadline: Annotated[str | None, typer.Option("--deadline", metavar="D", help="Start no notice after "
                                                 "this long (at most 1h); the rest are sent at the next "
                                                 "sweep [default: 1m].")] = None,
    json_out: JsonOption = False,
) -> None:
    """Pause (by timeout) every open escalation past its expiry, then send again the notices
    that failed (with backoff) or are due by --renotify-every, several at a time; for a cron
    job."""

    def action() -> SweepReport:
        from escalate.core.durations import MAX_SWEEP_DEADLINE_S, parse_duration
        from escalate.escalation.delivery import SweepLimits
        from escalate.reports.runs import sweep_all

        given: dict[str, Any] = {} if parallel is None else {"parallel": parallel}
        if deadline is not None:
            given["deadline_s"] = parse_duration(deadline, what="deadline", maximum=MAX_SWEEP_DEADLINE_S)
        options = open_options(runs_dir, lock_timeout, None, notify_cmd)
        return sweep_all(options.pop("location"), run=run, limits=SweepLimits(**given), **options)

    result = respond(json_out, action, lambda r: echo_line(
        f"swept {r['runs']} run(s): {len(r['expired'])} escalation(s) paused by timeout"
        + (f", {len(r['notified'])} notice(s) sent again" if r["notified"] else "")
        + (f", {len(r['deferred'])} left for the next sweep (--deadline)" if r["deferred"] else "")
        + (f", {len(r['failures'])} run(s) failed" if r["failures"] else "")
        + "".join(f"\n  {e['run']} {e['escalation_id']}" for e in r["expired"])
        + "".join(f"\n  {n['run']} {n['escalation_id']} notice {n['attempt'] or '?'}: "
                  f"{'delivered' if n['ok'] else 'failed'} ({n['detail']})" for n in r["notified"])))
    # A cron job must notice a run it could not sweep: each failure on stderr, and the exit
    # code of the first (the other runs were still swept).
    for failure in result["failures"]:
        print(f"escalate: {failure['run']}: {failure['message']}", file=sys.stderr)
    if result["failures"]:
        raise typer.Exit(result["failures"][0]["exit_code"])


def register(app: typer.Typer) -> None:
    """Add the approver's commands to ``app``."""
    for command in (approve, pause, cancel, withdraw, wait):
        app.command()(command)
    app.add_typer(escalations_app, name="escalations")
    app.command()(sweep)
