"""`python -m sae_toolkit` is the same as the `sae-toolkit` console script."""

from sae_toolkit.cli import main

raise SystemExit(main())
