"""`python -m service` is the `convserve` command."""

from service.cli import main

raise SystemExit(main())
