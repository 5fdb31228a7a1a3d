"""`python -m mixtral_jax.routing`: the routing analysis (`analysis/cli.py`; needs `.[plots]`)."""

import sys

from mixtral_jax.analysis.cli import main

if __name__ == "__main__":
    sys.exit(main())
