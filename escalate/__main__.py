"""``python -m escalate`` and the ``escalate`` console script: the CLI, started with the
collector paused (:func:`escalate.cli.main` turns it back on once start-up is frozen)."""

import gc


def main() -> None:
    """Entry point of the ``escalate`` console script and of ``python -m escalate``."""
    # Paused before typer and click are imported: loading them makes only what lives until
    # the process exits, and each collection meanwhile would walk it all and free nothing.
    gc.disable()
    import escalate.cli

    escalate.cli.main()


if __name__ == "__main__":
    main()
