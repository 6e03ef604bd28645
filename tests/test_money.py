"""Money: exact integer micros from decimal text, every refused form, and the float boundary."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from escalate import InvalidAmount, Ledger, Micros, Refused
from escalate.core.money import MAX_MICROS, MICROS_PER_USD, format_usd, parse_micros
from tests.conftest import Location

micros_values = st.integers(min_value=0, max_value=MAX_MICROS)


# ------------------------------------------------------------------ accepted forms


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("0", 0),
        ("12", 12_000_000),
        ("2.5", 2_500_000),
        ("2.50", 2_500_000),
        ("0.000001", 1),
        ("$0.000001", 1),
        ("$12", 12_000_000),
        (".5", 500_000),
        ("5.", 5_000_000),  # a trailing dot, like a leading one, is plain decimal text
        ("$2.", 2_000_000),
        ("$4.50", 4_500_000),
        ("0.1", 100_000),
        ("0.2", 200_000),
        ("0.3", 300_000),
        ("0001.5", 1_500_000),
        ("00000000000000000000001", 1_000_000),  # leading zeros are not "above the limit"
        ("999999999.999999", 999_999_999_999_999),
        ("1000000000", MAX_MICROS),
        ("$1000000000.000000", MAX_MICROS),
    ],
)
def test_text_parses_to_exact_micros(text: str, micros: int) -> None:
    assert parse_micros(text) == micros


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        (Decimal("2.5"), 2_500_000),
        (Decimal("0.000001"), 1),
        (Decimal("0.0000010"), 1),  # a trailing zero is not a 7th decimal of value
        (Decimal("1E+3"), 1_000_000_000),
        (Decimal("-0"), 0),
        (Decimal("1000000000"), MAX_MICROS),
        (Decimal("1." + "0" * 60), 1_000_000),  # more digits than the default context holds
        (Micros(0), 0),
        (Micros(7), 7),  # Micros is already micros
        (Micros(MAX_MICROS), MAX_MICROS),
    ],
)
def test_decimal_and_micros_parse_to_exact_micros(value: Any, micros: int) -> None:
    assert parse_micros(value) == micros


def test_float_sum_that_floats_get_wrong_is_exact() -> None:
    # 0.1 + 0.2 != 0.3 in binary floating point; in micros it is exact.
    assert parse_micros("0.1") + parse_micros("0.2") == parse_micros("0.3")


# ------------------------------------------------------------------ round trips


@given(micros_values)
@example(0)
@example(1)
@example(999_999)
@example(1_000_000)
@example(1_004_000)
@example(MAX_MICROS)
def test_format_round_trips_exactly(micros: int) -> None:
    text = format_usd(micros)
    assert text.startswith("$")
    # Thousands are grouped for people; the parser refuses separators (docs/library.md,
    # "Amounts and durations"), so the
    # round trip drops them. Nothing else is lost: no amount is rounded for display.
    assert parse_micros(text.replace(",", "")) == micros
    decimals = text.split(".")[1]
    # Two decimals for whole cents, else exactly the digits the amount has.
    assert len(decimals) == (2 if micros % 10_000 == 0 else len(f"{micros % 1_000_000:06d}".rstrip("0")))


@given(st.integers(-MAX_MICROS, -1))
def test_negative_amounts_are_exact_and_never_negative_zero(micros: int) -> None:
    text = format_usd(micros)
    assert text.startswith("-$") and text != "-$0.00"
    assert parse_micros(text[1:].replace(",", "")) == -micros


@given(micros_values)
def test_plain_decimal_text_round_trips(micros: int) -> None:
    whole, fraction = divmod(micros, MICROS_PER_USD)
    text = f"{whole}.{fraction:06d}"
    assert parse_micros(text) == micros
    assert parse_micros(Decimal(text)) == micros
    assert parse_micros("$" + text) == micros


@given(st.integers(0, 10**9), st.text(alphabet="0123456789", min_size=0, max_size=6),
       st.integers(0, 30))
def test_any_short_decimal_text_is_exact(whole: int, fraction: str, leading_zeros: int) -> None:
    text = "0" * leading_zeros + str(whole) + (f".{fraction}" if fraction else "")
    expected = whole * MICROS_PER_USD + int(fraction.ljust(6, "0") or "0")
    if expected > MAX_MICROS:
        with pytest.raises(InvalidAmount):
            parse_micros(text)
    else:
        assert parse_micros(text) == expected


@pytest.mark.parametrize(
    ("micros", "people"),
    [
        (0, "$0.00"),
        (4_500_000, "$4.50"),
        (4_500_001, "$4.500001"),
        (4_995_000, "$4.995"),
        (1_004_000, "$1.004"),
        (5_000_001, "$5.000001"),
        (-4_000, "-$0.004"),
        (-400_000, "-$0.40"),
        (-1, "-$0.000001"),
        (1_234_567_890_000, "$1,234,567.89"),
    ],
)
def test_format_usd_examples(micros: int, people: str) -> None:
    assert format_usd(micros) == people


# ------------------------------------------------------------------ refused forms
# (docs/library.md, "Amounts and durations")

REFUSED_TEXT = [
    pytest.param("", id="empty"),
    pytest.param(" ", id="blank"),
    pytest.param("$", id="dollar-only"),
    pytest.param(".", id="dot-only"),
    pytest.param("NaN", id="nan"),
    pytest.param("nan", id="nan-lower"),
    pytest.param("inf", id="inf"),
    pytest.param("Infinity", id="infinity"),
    pytest.param("-inf", id="minus-inf"),
    pytest.param("-1", id="negative"),
    pytest.param("-0.000001", id="negative-micro"),
    pytest.param("$-1", id="dollar-negative"),
    pytest.param("-0", id="negative-zero"),
    pytest.param("+1", id="plus-sign"),
    pytest.param("1e3", id="exponent"),
    pytest.param("1E3", id="exponent-upper"),
    pytest.param("2.5e-1", id="fraction-exponent"),
    pytest.param("1,000", id="thousands-comma"),
    pytest.param("1_000", id="thousands-underscore"),
    pytest.param("1 000", id="thousands-space"),
    pytest.param("1'000", id="thousands-apostrophe"),
    pytest.param("0.0000001", id="seven-decimals"),
    pytest.param("0.1000000", id="seven-decimals-trailing-zero"),
    pytest.param("\u0661", id="arabic-indic-digit"),
    pytest.param("\uff11", id="fullwidth-digit"),
    pytest.param("\u0968.5", id="devanagari-digit"),
    pytest.param("1000000000.000001", id="above-1e9-by-a-micro"),
    pytest.param("1000000001", id="above-1e9"),
    pytest.param("9" * 40, id="huge"),
    pytest.param("0x10", id="hex"),
    pytest.param("$$1", id="double-dollar"),
    pytest.param("1.2.3", id="two-dots"),
    pytest.param("12USD", id="unit-suffix"),
    pytest.param("1\n", id="newline"),
]


@pytest.mark.parametrize("text", REFUSED_TEXT)
def test_refused_text(text: str) -> None:
    with pytest.raises(InvalidAmount) as caught:
        parse_micros(text, what="estimate")
    error = caught.value
    assert error.exit_code == 2
    assert error.code == "invalid_amount"
    assert error.message.startswith("invalid estimate ")
    assert "\n" not in error.message
    assert error.to_json()["error"] == "invalid_amount"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        pytest.param("--json", "'--json': that is an option, not an amount — give a value",
                     id="next-option"),
        pytest.param("-0", "'-0': expected USD like 2.50", id="minus-zero-is-malformed-not-negative"),
        pytest.param("-0.00", "'-0.00': expected USD like 2.50", id="minus-zero-decimals"),
        pytest.param("-1", "'-1': must not be negative", id="negative"),
        pytest.param("1,000", "'1,000': remove the thousands separator, e.g. 1000", id="comma"),
        pytest.param("$12,500.50", "remove the thousands separator, e.g. $12500.50", id="comma-dollars"),
        pytest.param("1_000", "remove the thousands separator", id="underscore"),
        pytest.param("1,5", "'1,5': expected USD like 2.50", id="decimal-comma-is-not-grouping"),
    ],
)
def test_refusal_says_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(InvalidAmount) as caught:
        parse_micros(text, what="estimate")
    assert says in caught.value.message
    assert caught.value.code == "invalid_amount"


@pytest.mark.parametrize(("argv", "option"), [
    (("increase", "r", "t", "--to", "--json"), "--to"),
    (("runs", "set", "r", "--max-extension", "--json"), "--max-extension"),
    (("gate", "r", "--max-spent", "--json"), "--max-spent"),
])
def test_option_message_names_the_option(argv: tuple[str, ...], option: str, cli: Any,
                                         store: Location) -> None:
    assert cli("runs", "init", "r", "--cap", "5").exit_code == 0
    result = cli(*argv)
    assert result.exit_code == 2
    assert result.stderr.endswith(f"give a value after {option}\n"), result.stderr


def test_the_library_names_the_amount_not_a_cli_option() -> None:
    with pytest.raises(InvalidAmount) as caught:
        parse_micros("--json", what="new amount")
    assert caught.value.message.endswith("not an amount — give a value")
    assert caught.value.option_missing_for == "new amount"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(Decimal("NaN"), id="decimal-nan"),
        pytest.param(Decimal("sNaN"), id="decimal-snan"),
        pytest.param(Decimal("Infinity"), id="decimal-inf"),
        pytest.param(Decimal("-1"), id="decimal-negative"),
        pytest.param(Decimal("-1E+999999"), id="decimal-huge-negative"),
        pytest.param(Decimal("1E+999999"), id="decimal-huge"),
        pytest.param(Decimal("1000000000.000001"), id="decimal-above-1e9"),
        pytest.param(Decimal("0.0000001"), id="decimal-seven-decimals"),
        pytest.param(Decimal("1E-999999999"), id="decimal-tiny"),
        pytest.param(Decimal("0.1" + "0" * 30 + "1"), id="decimal-7th-decimal-behind-30-digits"),
        pytest.param(Micros(-1), id="micros-negative"),
        pytest.param(Micros(MAX_MICROS + 1), id="micros-above-1e9"),
        pytest.param(7, id="bare-int"),
        pytest.param(True, id="bool-true"),
        pytest.param(False, id="bool-false"),
        pytest.param(0.1, id="float"),
        pytest.param(1.0, id="float-integral"),
        pytest.param(None, id="none"),
        pytest.param(b"1", id="bytes"),
    ],
)
def test_refused_values(value: Any) -> None:
    with pytest.raises(InvalidAmount) as caught:
        parse_micros(value)
    assert caught.value.exit_code == 2
    assert "\n" not in caught.value.message


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_no_float_is_ever_accepted(value: float) -> None:
    with pytest.raises(InvalidAmount):
        parse_micros(value)  # type: ignore[arg-type]


@given(st.text(alphabet=st.characters(categories=["Nd"]), min_size=1, max_size=4))
def test_only_ascii_digits(digits: str) -> None:
    if digits.isascii():
        assert parse_micros(digits) == int(digits) * MICROS_PER_USD
    else:
        with pytest.raises(InvalidAmount):
            parse_micros(digits)


@given(st.text(max_size=20))
def test_arbitrary_text_parses_exactly_or_is_refused(text: str) -> None:
    try:
        micros = parse_micros(text)
    except InvalidAmount as error:
        assert error.exit_code == 2
        return
    # Whatever is accepted is plain ASCII decimal text whose value is exactly these micros.
    body = text.strip(" \t").removeprefix("$")
    assert body.replace(".", "", 1).isdigit() and body.isascii()
    assert Decimal(body) * MICROS_PER_USD == micros
    assert 0 <= micros <= MAX_MICROS


# ------------------------------------------------------------------ the float boundary


def test_float_boundary_library(store: Location) -> None:
    run = Ledger.init(store, "floaty", cap="0.30")
    assert run.reserve("a", "0.10")["remaining_micros"] == 200_000
    assert run.reserve("b", "0.20")["remaining_micros"] == 0
    state = run.state()
    assert (state.committed_micros, state.remaining_micros) == (300_000, 0)
    with pytest.raises(Refused) as caught:
        run.reserve("c", "0.000001")
    assert caught.value.code == "over_budget"
    assert caught.value.remaining_micros == 0
    state = run.state()
    assert state.committed_micros == 300_000
    assert state.tasks["c"].state == "halted"


def test_float_boundary_cli(cli: Any, store: Location) -> None:
    assert cli("runs", "init", "floaty", "--cap", "0.30").exit_code == 0
    assert cli("reserve", "floaty", "a", "--estimate", "0.10").exit_code == 0
    assert cli("reserve", "floaty", "b", "--estimate", "0.20", "--json").json()["remaining_micros"] == 0
    refused = cli("reserve", "floaty", "c", "--estimate", "0.000001", "--json")
    assert refused.exit_code == 3
    assert refused.json()["error"] == "over_budget"
    show = cli("runs", "show", "floaty", "--json").json()
    assert (show["committed_micros"], show["remaining_micros"]) == (300_000, 0)


# ------------------------------------------------------------------ through the CLI


CLI_REFUSED = ["", "NaN", "inf", "-1", "1e3", "1,000", "0.0000001", "\u0661", "1000000001", "abc"]


# Amounts are parsed before any store is opened: the file store runs every bad value, and the
# PostgreSQL store one per command (test_store_conformance.py holds what the stores differ in).
@pytest.mark.parametrize("bad", CLI_REFUSED)
@pytest.mark.parametrize("command", ["reserve", "increase", "release", "init"])
def test_cli_refuses_bad_amount_with_one_line(cli: Any, runs_dir: Path, bad: str, command: str) -> None:
    _refuses_bad_amount(cli, bad, command)


@pytest.mark.parametrize("command", ["reserve", "increase", "release", "init"])
def test_cli_refuses_bad_amount_on_postgresql(cli: Any, pg_url: str, monkeypatch: pytest.MonkeyPatch,
                                              command: str) -> None:
    monkeypatch.delenv("ESCALATE_RUNS_DIR")
    monkeypatch.setenv("ESCALATE_STORE", pg_url)
    _refuses_bad_amount(cli, "1e3", command)


def _refuses_bad_amount(cli: Any, bad: str, command: str) -> None:
    assert cli("runs", "init", "r", "--cap", "10").exit_code == 0
    assert cli("reserve", "r", "held", "--estimate", "1").exit_code == 0
    args = {
        "reserve": ["reserve", "r", "t", "--estimate", bad],
        "increase": ["increase", "r", "held", "--to", bad],
        "release": ["release", "r", "held", "--actual", bad],
        "init": ["runs", "init", "r2", "--cap", bad],
    }[command]
    result = cli(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert repr(bad) in lines[0]  # the message names the bad value

    as_json = cli(*args, "--json")
    assert as_json.exit_code == 2
    payload = as_json.json()
    assert payload["error"] == "invalid_amount"
    assert repr(bad) in payload["message"]
