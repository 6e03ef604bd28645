"""Money as integer micros (1 USD = 1,000,000), parsed exactly from decimal text.

No float is ever produced or accepted: text is split into its integer and fraction
digits and combined with integer arithmetic.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal, Inexact, localcontext

from escalate.errors import InvalidAmount

MICROS_PER_USD = 1_000_000
# 1e9 USD keeps every micro value below 2**53, exact for JSON readers that use doubles.
MAX_USD = 1_000_000_000
MAX_MICROS = MAX_USD * MICROS_PER_USD
# No total (a run's spent, reserved, committed or cap with its extensions, a pool period's)
# may pass 2**53 - 1 micros (about 9 billion USD): exact in doubles, far inside a signed
# 64-bit integer (SQLite's INTEGER, PostgreSQL's bigint). A remaining never goes below its
# negative either, since what is committed never passes it.
MAX_TOTAL_MICROS = 2**53 - 1
_ONE_MICRO_USD = Decimal("0.000001")


class Micros(int):
    """An amount in integer micros, said explicitly: ``Micros(2_500_000)`` is $2.50.

    A bare ``int`` is refused as an amount (``cap=10`` must never quietly mean ten micros),
    so micros need a type that the parser can tell from ``int`` at run time; a subclass of
    ``int`` (not a wrapper) keeps it usable wherever the micros it holds are an ``int``.
    """

    __slots__ = ()

    def __new__(cls, micros: int) -> Micros:
        # int("5") or int(2.7) would turn text or a float into micros by accident.
        if type(micros) is not int and not isinstance(micros, Micros):
            raise InvalidAmount(f"Micros takes an int count of micros, not {type(micros).__name__} "
                                f"{micros!r}; give USD as str or Decimal instead",
                                value=repr(micros)[:40])
        return super().__new__(cls, micros)

    def __repr__(self) -> str:
        return f"Micros({int(self)})"


Amount = str | Decimal | Micros

_USD_TEXT = re.compile(r"\$?([0-9]*)(?:\.([0-9]*))?", re.ASCII)
# The two below are text, compiled by ``re`` (and kept in its cache) when first needed: every
# command imports this module, and a plain amount needs neither.
# "1,000", "$12,500.50", "1 000", "1_000", "1'000": groups of three behind one separator.
_GROUPED = r"(?a)\$?[0-9]{1,3}([,_' ])[0-9]{3}(?:\1[0-9]{3})*(?:\.[0-9]*)?"
_SEPARATORS = frozenset(",_' ")
# "-0", "-0.00", "-$0" and "-" alone name no negative value: refused as malformed, not as negative.
_MINUS_NOTHING = r"(?a)-\$?0*\.?0*"


def parse_micros(value: Amount, *, what: str = "amount") -> int:
    """Return ``value`` in integer micros, or raise :class:`InvalidAmount`.

    ``str`` is decimal USD text (``2.5``, ``$0.000001``); ``Decimal`` is USD; :class:`Micros`
    is already micros. A bare ``int``, ``float`` or ``bool`` is refused: it does not say
    whether it means USD or micros. Negative values, more than 6 decimals and more than
    1e9 USD are refused.
    """
    if isinstance(value, Micros):
        micros = int(value)
    elif isinstance(value, Decimal):
        micros = _decimal_to_micros(value, what)
    elif isinstance(value, str):
        micros = _text_to_micros(value, what)
    else:
        shown = repr(value)[:40]
        raise InvalidAmount(
            f"invalid {what} {shown} of type {type(value).__name__}: give USD as str or Decimal "
            f"(e.g. \"2.50\" or Decimal(\"2.50\")), or micros as escalate.Micros(2_500_000)",
            value=shown,
        )
    if micros < 0:
        raise InvalidAmount(f"invalid {what} {value!r}: must not be negative; give 0 or more",
                            value=str(value))
    if micros > MAX_MICROS:
        raise InvalidAmount(
            f"invalid {what} {value!r}: above the limit of {MAX_USD:,} USD; give less", value=str(value)
        )
    return micros


def _text_to_micros(text: str, what: str) -> int:
    usd, point, decimals = text.partition(".")
    if usd.isascii() and usd.isdigit() and len(usd) <= 16 and (not point or (
            decimals.isascii() and decimals.isdigit() and len(decimals) <= 6)):
        # ASCII digits with up to 6 decimals and nothing else (the usual amount): nothing to
        # refuse here, and the value the checks below give (the caller checks the limit).
        return int(usd) * MICROS_PER_USD + (int(decimals.ljust(6, "0")) if point else 0)
    stripped = text.strip()
    if stripped.startswith("--"):
        # A missing value makes the parser take the next option as the amount. Which option
        # gives the amount is the caller's to say: ``what`` when it names one (``--max-spent``),
        # else the CLI adds it (from ``option_missing_for``).
        shown = _shown(text)
        after = f" after {what}" if what.startswith("--") else ""
        error = InvalidAmount(f"invalid {what} {shown!r}: that is an option, not an amount — give a "
                              f"value{after}", value=shown)
        error.option_missing_for = None if after else what
        raise error
    if stripped.startswith("-") and not re.fullmatch(_MINUS_NOTHING, stripped):
        raise InvalidAmount(f"invalid {what} {text[:40]!r}: must not be negative; give 0 or more",
                            value=text[:40])
    if not _SEPARATORS.isdisjoint(text) and re.fullmatch(_GROUPED, text.strip(" \t")):
        shown = _shown(text)
        raise InvalidAmount(
            f"invalid {what} {shown!r}: remove the thousands separator, e.g. "
            f"{re.sub(r'[^0-9$.]', '', text)}", value=shown)
    match = _USD_TEXT.fullmatch(text.strip(" \t"))
    whole = match.group(1) if match else ""
    fraction = match.group(2) if match else None
    # Refuse "", "$", "." and "-0" as well as anything the pattern does not match; "5." and ".5" pass.
    if match is None or (not whole and not fraction):
        shown = _shown(text)
        raise InvalidAmount(
            f"invalid {what} {shown!r}: expected USD like 2.50, 0.000001 or $12 "
            "(digits, an optional '.' and up to 6 decimals)",
            value=shown,
        )
    if fraction is not None and len(fraction) > 6:
        raise InvalidAmount(
            f"invalid {what} {text!r}: more than 6 decimals; round to 6 (0.000001 is the smallest unit)",
            value=text,
        )
    whole = whole.lstrip("0")  # leading zeros carry no value and must not trip the length guard
    if len(whole) > 16:  # far above the limit; avoids building huge ints from hostile input
        raise InvalidAmount(f"invalid {what} {text[:40]!r}: above the limit of {MAX_USD:,} USD; give less",
                            value=text[:40])
    return int(whole or "0") * MICROS_PER_USD + int((fraction or "").ljust(6, "0"))


def _shown(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


def _decimal_to_micros(value: Decimal, what: str) -> int:
    if not value.is_finite():
        raise InvalidAmount(f"invalid {what} {value}: not a finite number; give USD like 2.50",
                            value=str(value))
    if value < 0:
        raise InvalidAmount(f"invalid {what} {value}: must not be negative; give 0 or more", value=str(value))
    if value > MAX_USD:
        raise InvalidAmount(f"invalid {what} {value}: above the limit of {MAX_USD:,} USD; give less",
                            value=str(value))
    # Quantize in a context that traps rounding: the default 28-digit context would silently
    # round away a 7th decimal behind many digits, or turn 1E-999999999 into 0.
    try:
        with localcontext(Context(prec=40, traps=[Inexact])):
            exact = value.quantize(_ONE_MICRO_USD)
    except Inexact:
        raise InvalidAmount(
            f"invalid {what} {value}: more than 6 decimals; round to 6 (0.000001 is the smallest unit)",
            value=str(value),
        ) from None
    return int(exact.scaleb(6))


def format_usd(micros: int) -> str:
    """Money for people, exact: ``$4.50``, ``$1.004``, ``-$0.004``, ``$5.000001``.

    Two decimals when the amount is whole cents, and as many as it has (up to six) when it
    is not: a person never sees a rounded amount (``$1.00`` actual of a ``$1.00`` cap that
    was really ``$1.004``), and never ``-$0.00``.
    """
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}${whole:,}." + f"{fraction:06d}".rstrip("0").ljust(2, "0")
