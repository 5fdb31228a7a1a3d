"""ml-collections ConfigDicts. Each module has `get_config()`; build a model config
with `mixtral_jax.ModelConfig.from_dict(module.get_config())`."""
