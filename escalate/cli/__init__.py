"""The ``escalate`` command: parse, call one library method, render, map errors to exits.

Errors are mapped in one place (:func:`respond`): an :class:`EscalateError` becomes one
line on stderr (and one JSON object on stdout with ``--json``) and its exit code.
Usage errors from the parser become one line and exit 2 as well.

The command modules each add their commands to an app with ``register(app)``. ``escalate
reserve`` (and the other hot commands) builds an app from the one module that defines it,
so a shell loop does not pay for building every command; everything else, and ``app``
here, is the full app.
"""

import contextlib
import functools
import gc
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Protocol, TypeVar

import orjson
import typer
from typer._click.core import Context as ClickContext
from typer._click.exceptions import NoArgsIsHelpError  # typer 0.28 (pinned) vendors click here
from typer._click.globals import get_current_context
from typer.core import TyperCommand, TyperGroup, TyperOption

from escalate.errors import EscalateError, InputError, InvalidAmount, storage_error


class _OneLineErrors(TyperGroup):
    """Report parser errors as one line (``escalate: error: …``) and exit 2."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             windows_expand_args: bool = True, **extra: Any) -> Any:
        try:
            code = super().main(args=args, prog_name=prog_name or "escalate", complete_var=complete_var,
                                standalone_mode=False, windows_expand_args=windows_expand_args, **extra)
        except NoArgsIsHelpError as exc:
            # Bare ``escalate`` or ``escalate runs`` asks for the help: it is not an error.
            sys.stdout.write(exc.format_message().rstrip("\n") + "\n")
            sys.exit(0)
        except typer.TyperException as exc:
            message = exc.format_message().rstrip().rstrip(".")
            context = getattr(exc, "ctx", None)
            if context is not None and "\n" not in message:  # a hint glued to a block reads wrong
                message += f"; see '{context.command_path} --help'"
            # --json promises one JSON object on stdout for errors too, usage errors included.
            if "--json" in (sys.argv[1:] if args is None else args):
                print_json({"error": "usage", "message": message, "exit_code": 2})
            print(f"escalate: error: {message}", file=sys.stderr)
            sys.exit(2)
        except typer.Abort:
            print("escalate: aborted", file=sys.stderr)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


class _PlainUsage(TyperCommand):
    """Usage lines as people write them, ``RUN TASK``: typer wraps required arguments in
    braces, which read like a shell brace expansion. Every command that takes ``--runs-dir``
    also gets ``--store`` here, in one place (see :func:`given_store`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _add_store_option(self.params)

    def collect_usage_pieces(self, ctx: ClickContext) -> list[str]:
        return [piece[1:-1] if piece.startswith("{") and piece.endswith("}") else piece
                for piece in super().collect_usage_pieces(ctx)]


class StoreGroup(TyperGroup):
    """A group of commands that is a command itself (``escalate escalations``): its own
    ``--runs-dir`` gets ``--store`` beside it, as every command's does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _add_store_option(self.params)


def _add_store_option(params: list[Any]) -> None:
    names = [param.name for param in params]
    if "runs_dir" in names:
        params.insert(names.index("runs_dir"), _store_option())


def _use_plain_usage(app: typer.Typer) -> None:
    """Give every command of ``app`` and of its groups the :class:`_PlainUsage` class."""
    for command in app.registered_commands:
        if command.cls in (None, TyperCommand):  # typer's default, not a class chosen on purpose
            command.cls = _PlainUsage
    for group in app.registered_groups:
        if group.typer_instance is not None:
            _use_plain_usage(group.typer_instance)


# ------------------------------------------------------------------ shared options

RunsDirOption = Annotated[
    Path | None,
    # No envvar= on these options: escalate.config reads each variable, in one place.
    typer.Option("--runs-dir", metavar="PATH",
                 help="Runs root folder [default: ./runs].  [env var: ESCALATE_RUNS_DIR]"),
]
_STORE_KEY = "escalate.store"


def _store_option() -> TyperOption:
    # Not a parameter of each command function: the value waits in the context for
    # open_options, the one place every command's store is chosen.
    def keep(context: ClickContext, _param: Any, value: str | None) -> None:
        context.meta[_STORE_KEY] = value

    return TyperOption(param_decls=["--store"], type=str, default=None, expose_value=False,
                       callback=keep, metavar="URL|PATH",
                       help="Where runs live: a postgresql:// URL or a runs folder (instead of "
                       "--runs-dir).  [env var: ESCALATE_STORE]")


def given_store() -> str | None:
    """The ``--store`` given to the command running now, if any."""
    context = get_current_context(silent=True)
    return context.meta.get(_STORE_KEY) if context is not None else None


JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (errors too).")]
LockTimeoutOption = Annotated[
    str | None,
    # The library reads ESCALATE_LOCK_TIMEOUT itself, so that a bad value is reported under
    # the variable's name, not as if --lock-timeout had been given.
    typer.Option("--lock-timeout", metavar="DURATION",
                 help="Longest wait for the run's lock, e.g. 30s or 2m, at most 1d [env var: "
                 "ESCALATE_LOCK_TIMEOUT] [default: 30s]."),
]
ByOption = Annotated[
    str | None,
    typer.Option("--by", metavar="NAME",
                 help="Who is acting, recorded in every event [default: the OS user].  [env var: "
                 "ESCALATE_ACTOR]"),
]
NotifyOption = Annotated[
    str | None,
    typer.Option("--notify-cmd", metavar="CMD",
                 help="Shell command run with each new escalation's JSON on stdin, after the lock "
                 "is released.  [env var: ESCALATE_NOTIFY_CMD]"),
]
RunArg = Annotated[str, typer.Argument(help="Run id.", show_default=False, metavar="RUN")]


def open_options(runs_dir: Path | None, lock_timeout: str | None, by: str | None = None,
                 notify_cmd: str | None = None) -> dict[str, Any]:
    """Keyword arguments for :class:`escalate.Ledger` from the shared options; ``location``
    is where runs live (``--store``, ``--runs-dir`` or the default): a folder or a URL."""
    from escalate.config import default_store
    from escalate.core.durations import MAX_LOCK_TIMEOUT_S, parse_duration

    store = given_store()
    if store is not None and runs_dir is not None:
        raise InputError("--store and --runs-dir both say where runs live: give one",
                         code="usage")
    options: dict[str, Any] = {"location": store or runs_dir or default_store()}
    if lock_timeout is not None:
        options["lock_timeout"] = parse_duration(lock_timeout, what="lock timeout",
                                                 maximum=MAX_LOCK_TIMEOUT_S)
    if by is not None:
        # Only an explicit --by "" gets here (the library reads ESCALATE_ACTOR); falling back
        # to ESCALATE_ACTOR or the OS user would record someone the caller did not name.
        if not by:
            raise InputError("--by is empty: name who is acting, or leave --by out to use "
                             "ESCALATE_ACTOR or the OS user", code="invalid_actor")
        options["actor"] = by
    if notify_cmd is not None:
        options["notify_cmd"] = notify_cmd
    return options


class _Closable(Protocol):
    def close(self) -> None: ...


_C = TypeVar("_C", bound=_Closable)
# What the command opened (ledgers, pools, their stores): closed when it ends (respond).
_OPENED = contextlib.ExitStack()


def opened(thing: _C) -> _C:
    """``thing``, to be closed when the command ends (:func:`respond`), whatever happens."""
    _OPENED.callback(thing.close)
    return thing


def open_ledger(run: str, runs_dir: Path | None, lock_timeout: str | None, by: str | None = None,
                notify_cmd: str | None = None, *, progress: bool = False) -> "Ledger":
    """The :class:`escalate.Ledger` for an existing run; ``progress``: a reading command
    that shows a bar on a terminal while it replays a large log."""
    from escalate.service import Ledger

    options = open_options(runs_dir, lock_timeout, by, notify_cmd)
    ledger = opened(Ledger.open(options.pop("location"), run, **options))
    if progress:
        from escalate.reports.render import ReplayProgress

        ledger.progress = ReplayProgress()
    return ledger


# ------------------------------------------------------------------ output


def print_json(value: Any) -> None:
    data = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE)
    stdout = getattr(sys.stdout, "buffer", None)
    if stdout is None:  # a text-only stream, as some test harnesses give
        sys.stdout.write(data.decode())
        return
    sys.stdout.flush()  # keep order with anything already written as text
    stdout.write(data)
    stdout.flush()


def fail(error: EscalateError, json_out: bool) -> NoReturn:
    """Report ``error`` (one stderr line; JSON on stdout with ``--json``) and exit with its code."""
    if isinstance(error, InvalidAmount) and error.option_missing_for:
        error = _naming_the_option(error, error.option_missing_for)
    if json_out:
        print_json(error.to_json())
    print(f"escalate: {error.message}", file=sys.stderr)
    raise typer.Exit(error.exit_code)


# The library names an amount ("new amount"); the option that gives it is the CLI's word.
_OPTION_OF = {"new amount": "--to"}


def _naming_the_option(error: InvalidAmount, what: str) -> InvalidAmount:
    """``error`` with the option that gives the amount ``what`` named, as the user typed it."""
    option = _OPTION_OF.get(what, "--" + what.replace(" ", "-"))
    return InvalidAmount(f"{error.message} after {option}", code=error.code, **error.facts)


def respond(json_out: bool, action: Callable[[], Any], human: Callable[[Any], None]) -> Any:
    """Run ``action``; render its result for people or as JSON; map every error to its exit.
    What the command opened (:func:`opened`) is closed at the end."""
    with _OPENED:
        try:
            result = action()
        except EscalateError as error:
            fail(error, json_out)
        except OSError as exc:
            # The log layer names its files itself; this catches any other file a command touches.
            fail(storage_error(exc, exc.filename if isinstance(exc.filename, str) else "a file"), json_out)
        if json_out:
            print_json(result)
        else:
            human(result)
        return result


def echo_line(text: str) -> None:
    sys.stdout.write(text + "\n")


def bad_input(message: str, json_out: bool, code: str = "invalid_input") -> NoReturn:
    fail(InputError(message, code=code), json_out)


def _version_callback(value: bool) -> None:
    if value:
        from escalate._version import __version__

        echo_line(f"escalate {__version__}")
        raise typer.Exit(0)


def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Keep the money of concurrent work honest."""


def _hot_root() -> None:
    """Keep the money of concurrent work honest."""


# In the order ``escalate --help`` lists them.
COMMAND_MODULES = ("escalation_cmds", "gate_cmds", "ledger_cmds", "pools_cmds", "schema_cmds", "runs_cmds",
                   "store_cmds")
# The commands shell scripts call in loops, and the one module each needs.
_HOT_COMMANDS = {"reserve": "ledger_cmds", "increase": "ledger_cmds", "release": "ledger_cmds"}
# What a hot command loads besides the ledger (escalate.service), by where its runs are: a
# runs folder's store and its lock (filelock), or the PostgreSQL store (psycopg).
_HOT_STORES = {False: ("escalate.stores.file.store", "escalate.stores.file.lock"),
               True: ("escalate.stores.postgres.store",)}


def build_app(modules: Sequence[str] = COMMAND_MODULES, *, only: str | None = None) -> typer.Typer:
    """The ``escalate`` app with the commands of ``modules`` (module names in this package;
    ``only``: of those, the one command of that name, which a hot command's module offers)."""
    app = typer.Typer(
        cls=_OneLineErrors,
        name="escalate",
        help="Keep the money of concurrent work honest: reserve, raise and release slices of a "
        "run's budget; refusals halt or escalate to a person.",
        no_args_is_help=True,
        # A hot command's process takes no root option (its first word is the command's
        # name), so it builds none: neither the completion's nor --version (_hot_root).
        add_completion=only is None,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root if only is None else _hot_root)
    for module in modules:
        commands = importlib.import_module(f"{__name__}.{module}")
        if only is None:
            commands.register(app)
        else:
            commands.register(app, only=only)
    _use_plain_usage(app)
    return app


@functools.cache
def full_app() -> typer.Typer:
    """The app with every command, built once (``from escalate.cli import app`` gives it)."""
    return build_app()


if TYPE_CHECKING:
    from escalate.service import Ledger

    app: typer.Typer


def __getattr__(name: str) -> Any:
    # ``app`` is built on first use, so the hot commands never build the full app.
    if name == "app":
        return full_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """Entry point of the CLI (the ``escalate`` console script calls it through
    :func:`escalate.__main__.main`, with the collector already paused)."""
    # Start-up makes only what lives until the process exits: a collection during it walks
    # all of that and frees nothing, so the collector is paused until it is frozen, below.
    gc.disable()
    hot_module = _HOT_COMMANDS.get(sys.argv[1]) if len(sys.argv) > 1 else None
    app = full_app() if hot_module is None else build_app([hot_module], only=sys.argv[1])
    if hot_module is not None:
        _load_hot_library(sys.argv[2:])
    # What is loaded by now (typer, click, the app, a hot command's library) lives until the
    # process exits: kept out of the collector's walks, every full collection's and the last
    # one at exit, which otherwise cost a short command a tenth of its time. The collector
    # is on for everything the command makes.
    gc.freeze()
    gc.enable()
    app()


def _load_hot_library(args: Sequence[str]) -> None:
    """Load what a hot command given ``args`` will use: the ledger, and the store its runs
    are in (:func:`_where_runs_are`); a store that cannot be loaded is the command's to report."""
    from escalate.stores.seam import is_store_url

    importlib.import_module("escalate.service")
    try:
        modules = _HOT_STORES[is_store_url(_where_runs_are(args))]
    except EscalateError:  # (ESCALATE_STORE and ESCALATE_RUNS_DIR both set: the command says so)
        return
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:  # (psycopg missing: the command says which extra to install)
            return


def _where_runs_are(args: Sequence[str]) -> str:
    """Where a hot command's runs are, as ``--store``, ``--runs-dir`` or the environment
    name it: a guess (another option's value may read ``--store``), which decides only what
    is loaded before the freeze; a wrong one costs time, never a different outcome."""
    from escalate.config import default_store

    for at, arg in enumerate(args):
        if arg.startswith(("--store=", "--runs-dir=")):
            return arg.partition("=")[2]
        if arg in {"--store", "--runs-dir"} and at + 1 < len(args):
            return args[at + 1]
    return os.fspath(default_store())
