"""`python -m prism_jax.cli ...`: the same as the `prism-jax` console script."""

import sys

from prism_jax.cli import main

sys.exit(main())
