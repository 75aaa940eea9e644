"""``python -m handoffd`` runs the command-line interface."""

from handoffd.cli import main

raise SystemExit(main())
