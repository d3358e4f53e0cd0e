"""`python -m slimvlm` runs the command line, the same as the `slimvlm` script."""

from .cli import main

raise SystemExit(main())
