"""`python -m tokensift` (what `torchrun -m tokensift ...` runs on every rank)."""

import sys

from tokensift.cli import main

sys.exit(main())
