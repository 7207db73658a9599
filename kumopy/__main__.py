"""Run the kumopy command line: python -m kumopy."""

from kumopy.cli import main

raise SystemExit(main())
