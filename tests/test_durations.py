"""Durations: one parser, one formatter, a documented maximum for each, refused with exit 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from escalate import InputError, Ledger
from escalate.core.durations import (
    MAX_ESCALATION_TIMEOUT_S,
    MAX_LOCK_TIMEOUT_S,
    MAX_WAIT_S,
    MS_PER_UNIT,
    format_duration,
    parse_duration,
)
from tests.conftest import snapshot_tree
from tests.test_cli import assert_error

# ---------------------------------------------------------------------- parser and formatter


@given(st.integers(min_value=0, max_value=MAX_WAIT_S * 1000))
def test_exact_format_parses_back_to_the_same_milliseconds(ms: int) -> None:
    text = format_duration(ms / 1000)
    assert parse_duration(text, what="d", maximum=MAX_WAIT_S) == ms / 1000


@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=3),
       st.sampled_from(["", *MS_PER_UNIT]))
def test_text_parses_exactly_and_formats_to_the_same_value(number: int, decimals: int, unit: str) -> None:
    whole, fraction = divmod(number, 10**decimals)
    text = f"{whole}.{fraction:0{decimals}d}{unit}" if decimals else f"{whole}{unit}"
    numerator = number * MS_PER_UNIT[unit or "s"]  # the value in ms, times 10**decimals
    try:
        seconds = parse_duration(text, what="d", maximum=MAX_WAIT_S)
    except InputError as error:
        assert error.code == "invalid_duration"
        assert numerator % 10**decimals or numerator > MAX_WAIT_S * 1000 * 10**decimals
        return
    # Exact: the nearest float to the whole milliseconds, not a drifted float product.
    assert seconds == numerator // 10**decimals / 1000
    assert parse_duration(format_duration(seconds), what="d", maximum=MAX_WAIT_S) == seconds


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("1.5s", 1.5), ("250ms", 0.25), ("30m", 1800), ("1h", 3600), ("2d", 172800),
    (" 1H ", 3600), (".5s", 0.5), ("5.", 5), ("0", 0), ("1.1m", 66), ("0.001s", 0.001),
])
def test_parses(text: str, seconds: float) -> None:
    assert parse_duration(text, what="d", maximum=MAX_WAIT_S) == seconds


@pytest.mark.parametrize(("seconds", "exact", "rounded"), [
    (0, "0s", "0s"), (45, "45s", "45s"), (90, "90s", "1m"), (1800, "30m", "30m"),
    (11_100, "185m", "3h05m"), (187_200, "52h", "2d04h"), (86_400, "1d", "1d"), (1.5, "1.5s", "1s"),
    (0.25, "0.25s", "0s"), (61.25, "61.25s", "1m"), (-5, "-5s", "0s"),
])
def test_formats(seconds: float, exact: str, rounded: str) -> None:
    assert format_duration(seconds) == exact
    assert format_duration(seconds, exact=False) == rounded


@pytest.mark.parametrize("text", ["", " ", ".", "s", "1e21d", "-1s", "1.5.5s", "1 s", "1w", "\u0661s",
                                  "inf", "nan", "0.0001s", "1.5ms", "9" * 100_000 + "d"])
def test_malformed_or_too_fine_is_refused(text: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_duration(text, what="timeout", maximum=MAX_WAIT_S)
    assert caught.value.code == "invalid_duration" and caught.value.exit_code == 2
    assert caught.value.message.startswith("invalid timeout ") and len(caught.value.message) < 200


def test_the_maximum_is_allowed_and_one_millisecond_more_is_not() -> None:
    assert parse_duration("1d", what="lock timeout", maximum=MAX_LOCK_TIMEOUT_S) == MAX_LOCK_TIMEOUT_S
    with pytest.raises(InputError, match=r"invalid lock timeout '86400.001': above the limit of 1d; "
                                         r"give 1d or less"):
        parse_duration("86400.001", what="lock timeout", maximum=MAX_LOCK_TIMEOUT_S)


# ---------------------------------------------------------------------- the library


@pytest.mark.parametrize(("settings", "word"), [
    ({"escalation_timeout_s": 10**12}, "above the limit of 365d"),
    ({"escalation_timeout_s": 1e21}, "above the limit of 365d"),
    ({"escalation_timeout_s": MAX_ESCALATION_TIMEOUT_S + 1}, "above the limit of 365d"),
    ({"escalation_timeout_s": float("inf")}, "use a number"),
    ({"escalation_timeout_s": float("nan")}, "use a number"),
    ({"escalation_timeout_s": 0}, "give at least 1s"),
    ({"escalation_timeout_s": 1.5}, "whole seconds"),
    ({"escalation_timeout_s": True}, "not bool"),
    ({"lock_timeout": 10**9}, "above the limit of 1d"),
    ({"lock_timeout": -1}, "give 0 or more"),
    ({"notify_timeout": 1e300}, "above the limit of 1h"),
])
def test_library_refuses_the_same_durations(runs_dir: Path, settings: dict[str, Any], word: str) -> None:
    with pytest.raises(InputError, match=word) as caught:
        Ledger.init(runs_dir, "r", cap="10", escalation="enforce", **settings)
    assert caught.value.code == "invalid_duration"
    assert not (runs_dir / "r").exists()


def test_library_set_policy_and_wait_refuse_huge_durations(runs_dir: Path) -> None:
    run = Ledger.init(runs_dir, "r", cap="10", escalation="enforce", approval_threshold="1")
    before = snapshot_tree(runs_dir)
    with pytest.raises(InputError, match="above the limit of 365d"):
        run.set_policy(escalation_timeout_s=10**12)
    with pytest.raises(InputError, match="above the limit of 365d"):
        run.wait("e1", timeout_s=1e300)
    assert snapshot_tree(runs_dir) == before
    assert run.set_policy(escalation_timeout_s=MAX_ESCALATION_TIMEOUT_S)["status"] == "changed"


# ---------------------------------------------------------------------- the CLI, each crash of the issue


def _init(cli: Any, *extra: str) -> None:
    assert cli("runs", "init", "r", "--cap", "10", "--escalation", "enforce",
               "--approval-threshold", "1", *extra).exit_code == 0


@pytest.mark.parametrize("timeout", ["9999999d", "1000000000000000000000d", "1e21d", "366d", "0.5s"])
def test_init_refuses_an_escalation_timeout_out_of_bounds(cli: Any, runs_dir: Path, timeout: str) -> None:
    result = cli("runs", "init", "r", "--cap", "10", "--escalation", "enforce",
                 "--escalation-timeout", timeout, "--json")
    payload = assert_error(result, 2, "invalid_duration")
    assert "escalation timeout" in payload["message"]
    assert not runs_dir.exists() or not any(runs_dir.iterdir())


def test_the_longest_escalation_timeout_still_escalates(cli: Any, runs_dir: Path) -> None:
    # 365d is accepted, and a reserve that escalates under it writes a real expiry date.
    _init(cli, "--escalation-timeout", "365d")
    result = cli("reserve", "r", "t", "--estimate", "2", "--json")
    assert result.exit_code == 4, result.stdout
    assert result.json()["escalation_id"]


def test_set_refuses_a_huge_escalation_timeout(cli: Any, runs_dir: Path) -> None:
    _init(cli)
    before = snapshot_tree(runs_dir)
    assert_error(cli("runs", "set", "r", "--escalation-timeout", "9999999d", "--json"), 2, "invalid_duration")
    assert snapshot_tree(runs_dir) == before
    # The escalating reserve that used to crash with OverflowError is never reached.
    assert cli("reserve", "r", "t", "--estimate", "2", "--json").exit_code == 4


@pytest.mark.parametrize("args", [
    pytest.param(["reserve", "r", "t", "--estimate", "1", "--lock-timeout", "9999999d"], id="lock-timeout"),
    pytest.param(["reserve", "r", "t", "--estimate", "2", "--wait", "--timeout", "9999999d"],
                 id="reserve-wait-timeout"),
    pytest.param(["wait", "r", "e1", "--timeout", "400d"], id="wait-timeout"),
    pytest.param(["runs", "watch", "r", "--interval", "2h"], id="watch-interval"),
    pytest.param(["runs", "watch", "r", "--timeout", "9999999d"], id="watch-timeout"),
])
def test_commands_refuse_durations_above_their_maximum(cli: Any, runs_dir: Path, lock_holder: Any,
                                                        args: list[str]) -> None:
    _init(cli)
    before = snapshot_tree(runs_dir)
    # Held by another process: a lock timeout that passed the parser would be put to use here.
    with lock_holder(runs_dir / "r" / "events.ndjson.lock"):
        payload = assert_error(cli(*args, "--json"), 2, "invalid_duration")
    assert "above the limit of" in payload["message"]
    assert snapshot_tree(runs_dir) == before


def test_environment_variables_are_refused_by_name(cli: Any, runs_dir: Path, lock_holder: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _init(cli)
    before = snapshot_tree(runs_dir)
    for name in ("ESCALATE_LOCK_TIMEOUT", "ESCALATE_NOTIFY_TIMEOUT"):
        with monkeypatch.context() as env, lock_holder(runs_dir / "r" / "events.ndjson.lock"):
            env.setenv(name, "9999999d")
            payload = assert_error(cli("reserve", "r", "t", "--estimate", "2", "--json"), 2,
                                   "invalid_duration")
            assert payload["message"].startswith(f"invalid {name} '9999999d': above the limit of ")
    assert snapshot_tree(runs_dir) == before
