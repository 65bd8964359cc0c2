"""`python -m bench` is the `convserve-bench` command."""

from bench.cli import main

raise SystemExit(main())
