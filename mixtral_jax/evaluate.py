"""`python -m mixtral_jax.evaluate`: perplexity, and what quantizing costs
(`training/evaluate.py`)."""

import sys

from mixtral_jax.training.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
