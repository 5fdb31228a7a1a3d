"""Checkpoints: reading PyTorch-world weights, converting them, storing and loading ours.

hub.py       the one mapping between Hugging Face tensors and our parameters
sources.py   lazy readers of the three PyTorch checkpoint layouts, as Hub tensors
store.py     our Orbax checkpoints, written and read a piece (an expert) at a time
damage.py    a damaged Orbax checkpoint named in one line, the reader's echoes silenced
load.py      a checkpoint onto the devices, sharded and quantized as asked; tokenizers
convert.py   conversion and export, atomic and verified (CLI: tools/convert.py)
adapters.py  LoRA adapters saved alone, read back; a bank of several served at once
"""
