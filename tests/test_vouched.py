"""Who is who (docs/escalation.md): beside the claimed ``by``, every request, resolution and
policy change records ``role``, what the store vouches for (the OS user of the writing
process on the file store, the database role on PostgreSQL). Each row of the decision table
in docs/escalation.md is a test below, on both stores."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pwd
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import psycopg
import pytest

from escalate import Ledger, Pending, Refused
from escalate.errors import InputError
from escalate.stores.file import store as file_store_module
from escalate.stores.postgres.store import PgStore
from escalate.transfer import export_lines, import_log
from tests.conftest import rechained
from tests.pg_server import admin, pg_url, url_of

__all__ = ["pg_url"]  # the fixture, imported for the tests below

# who → (where to act as them, the vouched name the store records for them)
Person = Callable[[str], tuple[Any, str]]


@pytest.fixture(params=("file", "postgres"))
def person(request: pytest.FixtureRequest, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Person]:
    """``person("alice")``: where to act as the person alice, and what the store vouches for
    about her. On the file store her OS user (this process's, as the store reads it); on
    PostgreSQL a database role of her own."""
    monkeypatch.setenv("ESCALATE_ACTOR", "tester")
    if request.param == "file":
        def as_os_user(who: str) -> tuple[Any, str]:
            monkeypatch.setattr(file_store_module, "os_user", lambda: who)
            return tmp_path / "runs", who

        yield as_os_user
        return
    url: str = request.getfixturevalue("pg_url")
    database = urlsplit(url).path.lstrip("/")
    PgStore(url).prepare()
    made: list[str] = []

    def as_role(who: str) -> tuple[Any, str]:
        name = f"escalate_{os.getpid()}_{who}"
        if name not in made:
            with admin() as connection:
                connection.execute(f"DROP ROLE IF EXISTS {name}")
                connection.execute(f"CREATE ROLE {name} LOGIN")
            with psycopg.connect(url, autocommit=True) as connection:
                connection.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public "
                                   f"TO {name}")
                connection.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {name}")
            made.append(name)
        return url_of(database, user=name), name

    yield as_role
    with admin() as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        for name in made:
            connection.execute(f"DROP ROLE IF EXISTS {name}")


def _ask(person: Person, who: str, *, name: str = "worker", approvers: tuple[str, ...] = (),
         match: str = "claimed", run_id: str = "r") -> tuple[str, Any]:
    """Run ``run_id`` created and an escalation opened by ``who`` under the name ``name``."""
    where, _ = person(who)
    ledger = Ledger.init(where, run_id, cap="10", escalation="enforce", approval_threshold="1",
                         approvers=approvers, approvers_match=match, actor=name)
    with pytest.raises(Pending) as pending:
        ledger.reserve("t", "2")
    return pending.value.escalation_id, where


def _log(where: Any, run_id: str = "r") -> list[dict[str, Any]]:
    return [orjson.loads(line) for chunk in export_lines(where, run_id) for line in chunk.splitlines()]


def _refused(person: Person, who: str, escalation_id: str, name: str, code: str) -> None:
    where, _ = person(who)
    before = _log(where)
    with pytest.raises(Refused) as refused:
        Ledger.open(where, "r", actor=name).approve(escalation_id)
    assert refused.value.code == code, refused.value.message
    assert _log(where) == before  # nothing written


def test_every_decision_records_what_the_store_vouches_for(person: Person) -> None:
    """The request, the resolution and the policy change carry ``role``; --json shows both."""
    esc, _ = _ask(person, "alice", name="lead")
    where, bob = person("bob")
    approved = Ledger.open(where, "r", actor="lead").approve(esc)
    assert approved["status"] == "approved"  # two people, one display name: not the same person
    Ledger.open(where, "r", actor="lead").set_policy(max_extension="5")
    alice = person("alice")[1]
    lines = _log(where)
    request = next(line for line in lines if line["type"] == "escalation")
    resolution = next(line for line in lines if line["type"] == "escalation_resolved")
    change = next(line for line in lines if line["type"] == "policy_changed")
    assert (request["actor"], request["role"]) == ("lead", alice)
    assert (resolution["by"], resolution["role"]) == ("lead", bob)
    assert change["role"] == bob
    shown = Ledger.open(where, "r").state().escalations[esc].to_json()
    assert (shown["requested_by"], shown["requested_role"], shown["by"], shown["resolved_role"]) == \
        ("lead", alice, "lead", bob)


def test_the_same_person_under_the_same_name_is_refused(person: Person) -> None:
    esc, _ = _ask(person, "alice", name="lead")
    _refused(person, "alice", esc, "lead", "self_approval")


def test_one_person_under_two_names_approves_by_default_without_an_approver_list(person: Person) -> None:
    """A single-user shell script: the same OS user (or one shared role) asks as worker and
    approves as lead."""
    esc, where = _ask(person, "alice", name="worker")
    assert Ledger.open(where, "r", actor="lead").approve(esc)["status"] == "approved"


def test_with_an_approver_list_claimed_names_suffice_on_the_file_store_only(person: Person) -> None:
    """An approver list on PostgreSQL names roles (as it always has): the role that asked is
    refused under any name; on the file store, by default, the listed name approves."""
    where, alice = person("alice")
    on_postgres = isinstance(where, str)
    esc, _ = _ask(person, "alice", name="worker", approvers=(alice if on_postgres else "lead",))
    if on_postgres:
        _refused(person, "alice", esc, "lead", "self_approval")
    else:
        assert Ledger.open(where, "r", actor="lead").approve(esc)["status"] == "approved"


def test_vouched_policy_refuses_a_forged_name(person: Person) -> None:
    """``approvers_match: vouched``: the requester claiming an approver's name is refused:
    the list is matched on who she is."""
    _, bob = person("bob")
    esc, _ = _ask(person, "alice", name="worker", approvers=(bob,), match="vouched")
    _refused(person, "alice", esc, bob, "not_an_approver")


def test_vouched_policy_without_a_list_still_refuses_the_requester_under_another_name(person: Person) -> None:
    esc, _ = _ask(person, "alice", name="worker", match="vouched")
    _refused(person, "alice", esc, "lead", "self_approval")


def test_vouched_policy_matches_the_approver_list_on_the_vouched_name(person: Person) -> None:
    """carol claims bob's name: refused as no approver; bob himself, under any name, approves."""
    _, bob = person("bob")
    esc, _ = _ask(person, "alice", name="worker", approvers=(bob,), match="vouched")
    _refused(person, "carol", esc, bob, "not_an_approver")
    where, _ = person("bob")
    assert Ledger.open(where, "r", actor="whoever").approve(esc)["status"] == "approved"


def test_vouched_policy_guards_policy_changes(person: Person) -> None:
    _, bob = person("bob")
    _ask(person, "alice", name="worker", approvers=(bob,), match="vouched")
    where, _ = person("alice")
    with pytest.raises(Refused) as refused:
        Ledger.open(where, "r", actor=bob).set_policy(approvers="worker")
    assert refused.value.code == "not_an_approver"
    where, _ = person("bob")
    assert Ledger.open(where, "r", actor="x").set_policy(max_extension="3")["status"] == "changed"


def test_another_person_naming_the_requester_cannot_withdraw(person: Person) -> None:
    esc, _ = _ask(person, "alice", name="worker")
    where, _ = person("bob")
    with pytest.raises(Refused) as refused:
        Ledger.open(where, "r").withdraw(esc, by="worker")
    assert refused.value.code == "not_the_requester"
    where, _ = person("alice")
    assert Ledger.open(where, "r").withdraw(esc, by="worker")["status"] == "withdrawn"


def test_the_postgres_case_of_the_issue_approves(person: Person, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker role opens an escalation; the alice role, an approver, runs approve without
    --by: both names default to the same OS user, and she is not refused for it."""
    monkeypatch.delenv("ESCALATE_ACTOR")
    where, alice = person("alice")
    # (An approver list on the file store names OS users under approvers_match vouched.)
    match = "claimed" if isinstance(where, str) else "vouched"
    esc, _ = _ask(person, "worker", name=_os_name(), approvers=(alice,), match=match)
    where, _ = person("alice")
    approved = Ledger.open(where, "r").approve(esc)
    assert approved["status"] == "approved" and approved["by"] == _os_name()


def _os_name() -> str:
    import getpass

    return getpass.getuser()


def _forged(where: Any, change: Callable[[dict[str, Any]], None], *, drop_roles: bool = False) -> bytes:
    """The run's log with its resolution edited by ``change`` and the chain fixed up, as
    someone with write access to the file could write it (``drop_roles``: as lines from
    before ``role`` was recorded)."""
    lines = _log(where)
    for line in lines:
        if drop_roles:
            line.pop("role", None)
        if line["type"] == "escalation_resolved":
            change(line)
    return rechained(lines)


def _rechained(log: bytes) -> bytes:
    return rechained([orjson.loads(raw) for raw in log.splitlines()])


def test_verify_and_import_refuse_a_log_where_the_requester_approved(person: Person) -> None:
    """A hand-made log in which the requester approved their own escalation (a valid hash
    chain): the resolution's vouched identity is the requester's."""
    esc, where = _ask(person, "alice", name="lead")
    alice = person("alice")[1]
    where, _ = person("bob")
    Ledger.open(where, "r", actor="boss").approve(esc)

    def as_requester(line: dict[str, Any]) -> None:
        line["by"], line["role"] = "lead", alice

    forged = _forged(where, as_requester)
    with pytest.raises(InputError) as refused:
        import_log(where, "copy", forged)
    assert "who asked for it" in refused.value.message
    if isinstance(where, Path):  # the log file itself, edited in place: runs verify
        (where / "r" / "events.ndjson").write_bytes(forged)
        for side in (where / "r").iterdir():
            if side.name != "events.ndjson":
                side.unlink()
        problems = Ledger.open(where, "r").verify().problems
        assert problems and "who asked for it" in str(problems[0])


def test_verify_refuses_a_resolver_outside_a_vouched_list(person: Person) -> None:
    _, bob = person("bob")
    esc, _ = _ask(person, "alice", name="worker", approvers=(bob,), match="vouched")
    where, _ = person("bob")
    Ledger.open(where, "r", actor="boss").approve(esc)
    _, carol = person("carol")

    def as_carol(line: dict[str, Any]) -> None:
        line["by"], line["role"] = bob, carol

    with pytest.raises(InputError) as refused:
        import_log(where, "copy", _forged(where, as_carol))
    assert "not one of the approvers" in refused.value.message


def test_old_lines_without_a_vouched_identity_compare_names(tmp_path: Path) -> None:
    """Lines from before ``role`` was recorded: the names tell, as they always did."""
    where = tmp_path / "runs"
    esc, _ = _ask(lambda who: (where, who), "alice", name="lead")
    Ledger.open(where, "r", actor="boss").approve(esc)
    old = b"".join(orjson.dumps({key: value for key, value in line.items() if key != "role"}) + b"\n"
                   for line in _log(where))
    import_log(where, "old", _rechained(old))  # another name resolved it: fine

    def by_requester(line: dict[str, Any]) -> None:
        line["by"] = "lead"

    with pytest.raises(InputError) as refused:
        import_log(where, "copy", _forged(where, by_requester, drop_roles=True))
    assert "who asked for it" in refused.value.message


def _as_nobody(runs: str, scratch: str, args: list[str]) -> None:
    """A forked child that drops root for ``nobody`` and runs the command, every name in
    its environment claiming root. (It runs the command once in ``scratch`` first, still as
    root: the modules it loads live where nobody may not read. A fresh process reads its
    uid afresh: the fork's copy of the parent's answer is dropped.)"""
    from escalate.cli import app

    os.environ.update(USER="root", LOGNAME="root", ESCALATE_ACTOR="root", ESCALATE_RUNS_DIR=scratch)
    os.environ.pop("ESCALATE_STORE", None)
    with contextlib.suppress(SystemExit):
        app(args)
    nobody = pwd.getpwnam("nobody")
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
    os.environ["ESCALATE_RUNS_DIR"] = runs
    file_store_module.os_user.cache_clear()
    try:
        app(args)
    except SystemExit as exit:
        os._exit(int(exit.code or 0))
    os._exit(0)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another OS user")
def test_the_file_store_vouches_for_the_uid_not_the_environment() -> None:
    """A real process running as ``nobody``, with $USER, $LOGNAME and $ESCALATE_ACTOR all
    claiming root: its line records ``role: nobody``."""
    nobody = pwd.getpwnam("nobody")
    with tempfile.TemporaryDirectory() as top:  # (pytest's tmp_path is root's alone)
        os.chmod(top, 0o755)
        runs = Path(top) / "runs"
        runs.mkdir()
        os.chown(runs, nobody.pw_uid, nobody.pw_gid)
        _record_as_nobody(runs)


def _record_as_nobody(runs: Path) -> None:
    forked = multiprocessing.get_context("fork")
    for args, code in ((["runs", "init", "r", "--cap", "5", "--escalation", "enforce",
                         "--approval-threshold", "1"], 0),
                       (["reserve", "r", "t", "--estimate", "2"], 4)):
        child = forked.Process(target=_as_nobody, args=(str(runs), str(runs.parent / "scratch"), args))
        child.start()
        child.join()
        assert child.exitcode == code
    [request] = [line for line in _log(runs) if line["type"] == "escalation"]
    assert (request["actor"], request["role"]) == ("root", "nobody")
