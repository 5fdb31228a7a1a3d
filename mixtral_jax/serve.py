"""`python -m mixtral_jax.serve`: the OpenAI-compatible server (`inference/serve_cli.py`)."""

import sys

from mixtral_jax.inference.serve_cli import main

if __name__ == "__main__":
    sys.exit(main())
