"""`python -m mixtral_jax.train`: the fine-tuning and training command (`training/train.py`)."""

import sys

from mixtral_jax.training.train import main

if __name__ == "__main__":
    sys.exit(main())
