"""``python -m escalate`` runs the CLI."""

from escalate.cli import main

main()
