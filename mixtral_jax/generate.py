"""`python -m mixtral_jax.generate`: the generation command (`inference/cli.py`).

A command, not a module: `mixtral_jax.generate` is the function
(`mixtral_jax.inference.generate.generate`), which importing this file would hide.
"""

import sys

if __name__ != "__main__":
    raise ImportError(
        "mixtral_jax/generate.py is the command `python -m mixtral_jax.generate`; the function "
        "is mixtral_jax.generate, its module mixtral_jax.inference.generate"
    )

from mixtral_jax.inference.cli import main  # noqa: E402

sys.exit(main())
