"""`python -m bemsmail` runs the CLI."""

from bemsmail.cli import main

raise SystemExit(main())
