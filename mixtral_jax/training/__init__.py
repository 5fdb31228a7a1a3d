"""Training: fine-tuning (full, LoRA, QLoRA) and training from scratch, and evaluation.

data.py       training records -> ids and loss masks -> packed rows and batches
steps.py      jitted forward, eval and train step on a mesh, with explicit shardings
train.py      the training loop and its CLI `python -m mixtral_jax.train`: optimizer,
              checkpoints, resume, preemption, metrics, export
lora.py       adding LoRA adapters to a model and merging them back
resume.py     resuming from the newest checkpoint step that restores, damaged ones set aside
metrics.py    TensorBoard event files, a JSONL log, model FLOPs and MFU
evaluate.py   perplexity and what quantization costs; CLI `python -m mixtral_jax.evaluate`
"""
