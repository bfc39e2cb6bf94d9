"""`python -m pgwarden` is the `pgwarden` command."""

from pgwarden.cli import main

raise SystemExit(main())
