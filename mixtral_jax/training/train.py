"""Fine-tuning (full or LoRA) and training from scratch, from one ml-collections config.

    python -m mixtral_jax.train --config configs/finetune_lora.py \\
        --config.checkpoint=/ckpt/mixtral-8x7b --workdir /tmp/run [--config.steps=1000]

A run lives in its work directory: `checkpoints/` (Orbax, every
`checkpoint_every` steps, the last `keep_checkpoints` kept, saved asynchronously),
`metrics.jsonl` and TensorBoard event files, and at the end `export/` (a
checkpoint like tools/convert.py writes, LoRA merged into the weights) and, for
LoRA, `adapters/` (the adapters alone, for `lora.load_adapters` on the base). QLoRA:
`config.model.quantization="int8"|"int4"` quantizes the frozen base as it loads
(configs/finetune_qlora.py); the export is then float, merged. Run the
same command again and it resumes from the newest checkpoint that restores
(`resume.py`: damaged newer ones are named and moved to `damaged/`): parameters,
optimizer state, step and the data position (epoch and batch), so the losses
are those of a run that was never stopped. SIGTERM (a TPU preemption notice)
saves a checkpoint after the current step and exits with status 143.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import shutil
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from mixtral_jax.checkpoints import load, store
from mixtral_jax.model.config import ARCHITECTURE_FIELDS, ConfigError, ModelConfig
from mixtral_jax.model.layers import LoRAParam
from mixtral_jax.model.mixtral import Mixtral, with_config
from mixtral_jax.model.tokenizer import Tokenizer
from mixtral_jax.parallel import distributed
from mixtral_jax.parallel.mesh import MeshConfig
from mixtral_jax.parallel.placement import param_shardings
from mixtral_jax.params import flat_params, key_path, set_params
from mixtral_jax.training import data, lora, metrics, resume, steps
from mixtral_jax.training.evaluate import mean_nll

PREEMPTED_EXIT = 128 + signal.SIGTERM


def make_optimizer(opt: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformation:
    """AdamW on a warmup + cosine schedule, after clipping the global gradient norm.
    Weight decay skips the norms' scales."""
    optimizer = optax.adamw(
        learning_rate_schedule(opt, steps),
        b1=opt.b1,
        b2=opt.b2,
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        mask=lambda params: jax.tree_util.tree_map_with_path(
            lambda keys, _: key_path(keys)[-1] != "scale", params
        ),
    )
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip), optimizer)


def learning_rate_schedule(opt: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to peak x end ratio."""
    warmup = min(opt.warmup_steps, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1),
        end_value=opt.learning_rate * opt.end_learning_rate_ratio,
    )


def trainable_filter(config: ml_collections.ConfigDict):
    """What the optimizer updates: the adapters (LoRA), or every weight but the
    router's when it is frozen, or every weight."""
    if config.lora.rank:
        return LoRAParam
    if config.optimizer.freeze_router:
        return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("gate")))
    return nnx.Param


def build_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Mixtral:
    """The base model (loaded into its shardings, or initialised from the seed), its
    execution settings from `config.model`, LoRA adapters added when asked."""
    overrides = config.model.to_dict() if config.model is not None else {}
    if config.checkpoint:
        dtype = overrides.get("param_dtype")
        scheme = overrides.pop("quantization", None)  # QLoRA: quantize the base as it loads
        group_size = overrides.pop("quant_group_size", 128)
        if scheme and store.read_config(config.checkpoint)[0].quantization == scheme:
            scheme = None  # already stored so
        model = load.load(
            config.checkpoint, dtype=dtype, mesh=mesh, quantize=scheme, group_size=group_size
        )
        architecture = {k: v for k, v in overrides.items() if k in ARCHITECTURE_FIELDS}
        stored = model.config.to_dict()
        different = {k: (v, stored[k]) for k, v in architecture.items() if v != stored[k]}
        if different:
            raise ConfigError(
                "config.model describes another architecture than the checkpoint's "
                + ", ".join(f"{k}={a!r} (checkpoint: {b!r})" for k, (a, b) in different.items())
                + "; remove these fields from config.model or fix them"
            )
        execution = {k: v for k, v in overrides.items() if k not in ARCHITECTURE_FIELDS}
        new_config = ModelConfig.from_dict({**stored, **execution})  # errors name the field
        model = with_config(model, new_config, config.seed)
    else:
        model_config = ModelConfig.from_dict(overrides)
        model = nnx.eval_shape(lambda: Mixtral(model_config, rngs=nnx.Rngs(config.seed)))
        shardings = param_shardings(model, mesh)
        # Initialised straight into its shardings: no device ever holds the whole model.
        init = jax.jit(
            lambda: flat_params(Mixtral(model_config, rngs=nnx.Rngs(config.seed))),
            out_shardings=shardings,
        )
        set_params(model, init())
    if model.config.quantization and not config.lora.rank:
        raise ConfigError(
            f"the base model is quantized ({model.config.quantization}) and stays frozen: "
            "train LoRA adapters on it (QLoRA, config.lora.rank > 0), or fine-tune the "
            "float weights"
        )
    if config.lora.rank:
        model = lora.add_adapters(
            model,
            rank=config.lora.rank,
            alpha=config.lora.alpha,
            targets=names(config.lora.targets),
            seed=config.seed,
        )
    return model


def load_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    if config.tokenizer:
        return Tokenizer.from_file(config.tokenizer)
    if config.checkpoint:
        return load.load_tokenizer(config.checkpoint)
    raise ConfigError("config.tokenizer is empty and there is no checkpoint to take one from")


@dataclasses.dataclass
class DataPosition:
    """Where the batch stream is: the epoch and the batches already taken from it."""

    epoch: int = 0
    batch: int = 0


def batch_stream(
    examples: Sequence[data.Example],
    config: ml_collections.ConfigDict,
    rows: slice,
    position: DataPosition,
) -> Iterator[tuple[DataPosition, dict[str, np.ndarray]]]:
    """(position after the batch, this host's rows of it), endlessly, epoch after epoch,
    starting at `position`: deterministic in (seed, epoch), so a resumed run gets
    the batches the interrupted one would have."""
    epoch, skip = position.epoch, position.batch
    while True:
        epoch_batches = data.batches(
            examples,
            seq_len=config.data.seq_len,
            batch_size=config.data.batch_size,
            seed=config.seed,
            epoch=epoch,
            rows=rows,
        )
        index = 0
        for index, batch in enumerate(itertools.islice(epoch_batches, skip, None), skip + 1):
            yield DataPosition(epoch, index), batch
        if index == 0 and skip == 0:
            raise data.DataError(
                f"the training data fills no batch of {config.data.batch_size} rows of "
                f"{config.data.seq_len} tokens; add data or lower data.batch_size"
            )
        epoch, skip = epoch + 1, 0


def names(value: str | Sequence[str]) -> tuple[str, ...]:
    """A comma-separated string (the command line's form) or a sequence, as a tuple."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(item.strip() for item in items if item.strip())


class Preemption:
    """Turns SIGTERM into a flag that the loop checks after each step. With several
    processes they agree (any one signalled stops all at the same step), since the
    checkpoint they then save together is a collective operation."""

    def __init__(self):
        self._signalled = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self._signalled = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self._signalled
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self._signalled))
        return bool(np.any(flags))

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Errors that name the field, before anything is loaded."""
    required = [f.name for f in dataclasses.fields(ModelConfig) if f.default is dataclasses.MISSING]
    missing = [k for k in required if k not in (config.model or {})]
    if not config.checkpoint and missing:
        raise ConfigError(
            f"config.checkpoint is not set and config.model does not describe a model "
            f"(no {', '.join(missing[:3])}, ...): give --config.checkpoint=DIR, a directory "
            "written by tools/convert.py"
        )
    for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        value = config[name]
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"config.{name} must be a positive integer, got {value!r}")
    for name in ("seq_len", "batch_size", "eval_batches"):
        value = config.data[name]
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"config.data.{name} must be a positive integer, got {value!r}")
    if not names(config.data.train):
        raise ConfigError("config.data.train is empty; give .txt or .jsonl files, comma-separated")
    accumulate = config.optimizer.accumulate
    if not isinstance(accumulate, int) or accumulate < 1 or config.data.batch_size % accumulate:
        raise ConfigError(
            f"config.optimizer.accumulate={accumulate!r} must be a positive integer that "
            f"divides config.data.batch_size={config.data.batch_size}"
        )
    if config.lora.rank and config.optimizer.freeze_router:
        raise ConfigError(
            "config.optimizer.freeze_router has no effect with LoRA (the base is frozen)"
        )


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Runs (or resumes) the training of `config` in `workdir`; returns the last metrics."""
    check_config(config)
    workdir = Path(workdir)
    try:
        mesh = MeshConfig.from_dict(config.mesh).make_mesh()
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    tokenizer = load_tokenizer(config)
    train_files = names(config.data.train)
    train_examples = [data.tokenize(r, tokenizer) for r in data.read_records(train_files)]
    eval_examples = None
    if config.data.eval:
        eval_files = names(config.data.eval)
        eval_examples = [data.tokenize(r, tokenizer) for r in data.read_records(eval_files)]

    model = build_model(config, mesh)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary "
            f"is {model.config.vocab_size}; use the model's own tokenizer"
        )
    optimizer = make_optimizer(config.optimizer, config.steps)
    schedule = learning_rate_schedule(config.optimizer, config.steps)
    train_step = steps.jit_train_step(
        model,
        optimizer,
        mesh,
        trainable=trainable_filter(config),
        accumulate=config.optimizer.accumulate,
    )
    try:
        steps.check_rows(config.data.batch_size, train_step.batch_sharding, train_step.accumulate)
    except ValueError as e:
        raise ConfigError(f"config.data.batch_size={config.data.batch_size}: {e}") from None
    evaluate = steps.jit_eval(model, mesh)
    state = train_step.init(model)
    del model  # its parameters now live in `state` and `train_step.frozen`

    checkpoints = workdir / "checkpoints"
    # A save that was killed leaves its temporary directory; the manager deletes it.
    cut_short = bool(resume.unfinished_saves(checkpoints))
    manager = ocp.CheckpointManager(
        checkpoints.absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,
        ),
    )
    position = DataPosition()
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored = resume.restore_newest(
        manager, lambda step: _restore(manager, step, target), target, workdir / "damaged"
    )
    if restored is not None:
        state, position = _resumed(restored, manager.directory, config.seed)
        print(f"resumed from step {int(state.step)} ({checkpoints})", flush=True)
    elif cut_short:  # Orbax has cleared what a killed save left: say why we start afresh
        print(
            f"{checkpoints} holds no finished step (the first save was cut short): "
            "starting from step 0",
            flush=True,
        )

    rows = distributed.host_rows(train_step.batch_sharding, config.data.batch_size)
    stream = batch_stream(train_examples, config, rows, position)
    writer = metrics.SummaryWriter(workdir) if jax.process_index() == 0 else None
    c = train_step.model(state).config
    trained = sum(x.size for x in jax.tree.leaves(state.params))
    total = trained + sum(x.size for x in jax.tree.leaves(train_step.frozen))
    throughput = metrics.Throughput(
        tokens_per_step=config.data.batch_size * config.data.seq_len,
        flops_per_token=metrics.flops_per_token(c, config.data.seq_len, trained / total),
        peak=metrics.peak_flops(mesh),
    )
    _print_plan(config, c, mesh, trained, total)

    preemption = Preemption()
    last: dict[str, float] = {}
    try:
        for step in range(int(state.step), config.steps):
            position, local = next(stream)
            batch = distributed.global_batch(local, train_step.batch_sharding)
            state, step_metrics = train_step(state, batch)
            throughput.step(step_metrics)
            done, preempted = step + 1, preemption.requested()
            if preempted or done % config.checkpoint_every == 0 or done == config.steps:
                manager.save(done, args=_save_args(state, position, config.seed), force=True)
            if done % config.log_every == 0 or done == config.steps:
                last = _step_values(step_metrics, c, schedule(step))
                last.update(throughput.report())
                _log(writer, done, last, np.asarray(step_metrics["expert_fraction"]), config)
            if eval_examples and (done % config.eval_every == 0 or done == config.steps):
                eval_values = _evaluate(evaluate, train_step, state, eval_examples, config)
                _log(writer, done, eval_values, None, config)
                last.update(eval_values)
                throughput.restart()  # evaluation is not training time
            if preempted:
                manager.wait_until_finished()
                print(f"SIGTERM: saved step {done}; run the same command to resume", flush=True)
                sys.exit(PREEMPTED_EXIT)
        manager.wait_until_finished()
        if config.export:
            _export(train_step, state, tokenizer, workdir / "export")
            if config.lora.rank:
                lora.save_adapters(train_step.model(state), workdir / "adapters")
                if jax.process_index() == 0:
                    print(f"saved the adapters alone to {workdir / 'adapters'}", flush=True)
    finally:
        preemption.restore()
        manager.close()
        if writer:
            writer.close()
    return last


def _save_args(state: steps.TrainState, position: DataPosition, seed: int):
    # No random numbers are drawn after initialisation (no dropout): the data order,
    # a function of (seed, epoch), is the only randomness a resumed run must replay.
    return ocp.args.Composite(
        **{resume.STATE: ocp.args.StandardSave(state)},
        **{resume.POSITION: ocp.args.JsonSave({**dataclasses.asdict(position), "seed": seed})},
    )


def _restore(manager: ocp.CheckpointManager, step: int, target):
    """Checkpoint `step`, every array restored into the sharding its `target` has."""
    return manager.restore(
        step,
        args=ocp.args.Composite(
            **{resume.STATE: ocp.args.StandardRestore(target)},
            **{resume.POSITION: ocp.args.JsonRestore()},
        ),
    )


def _resumed(restored, directory, seed: int) -> tuple[steps.TrainState, DataPosition]:
    saved = dict(restored[resume.POSITION])
    if (saved_seed := saved.pop("seed")) != seed:
        raise ConfigError(
            f"the checkpoints in {directory} come from a run with seed "
            f"{saved_seed}, not config.seed={seed}; use that seed to resume, "
            "or another --workdir to start afresh"
        )
    return restored[resume.STATE], DataPosition(**saved)


def _evaluate(evaluate, train_step, state, examples, config) -> dict[str, float]:
    """Loss and perplexity over the first `eval_batches` batches of the held-out data."""
    params = nnx.state(train_step.model(state), nnx.Param)
    result = mean_nll(
        evaluate,
        params,
        examples,
        config.data.seq_len,
        config.data.batch_size,
        config.data.eval_batches,
    )
    return {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"]}


def _step_values(step_metrics: dict, c: ModelConfig, learning_rate) -> dict[str, float]:
    """The step's scalar metrics, its learning rate, and the busiest expert's load
    relative to perfect balance (k / E of the choices each)."""
    values = {k: float(v) for k, v in step_metrics.items() if np.ndim(v) == 0}
    values["learning_rate"] = float(learning_rate)
    load = np.asarray(step_metrics["expert_fraction"])  # [E], sums to k
    values["expert_load_max"] = float(load.max() * c.num_experts / c.num_experts_per_tok)
    return values


def _log(writer, step: int, values: dict[str, float], load, config) -> None:
    if jax.process_index() != 0:
        return
    writer.scalars(step, values)
    if load is not None:
        writer.scalars(step, {f"expert_load/{e}": float(f) for e, f in enumerate(load)})
    shown = [f"step {step}/{config.steps}"]
    for key, fmt in (
        ("loss", "loss {:.4f}"),
        ("cross_entropy", "ce {:.4f}"),
        ("eval_loss", "eval loss {:.4f}"),
        ("eval_perplexity", "eval ppl {:.2f}"),
        ("dropped_fraction", "dropped {:.3f}"),
        ("expert_load_max", "max load {:.2f}x"),
        ("grad_norm", "|g| {:.3f}"),
        ("learning_rate", "lr {:.2e}"),
        ("tokens_per_s", "{:,.0f} tok/s"),
        ("mfu", "MFU {:.1%}"),
    ):
        if key in values:
            shown.append(fmt.format(values[key]))
    print(" | ".join(shown), flush=True)


def _print_plan(config, c: ModelConfig, mesh, trained: int, total: int) -> None:
    if jax.process_index() != 0:
        return
    what = f"LoRA rank {config.lora.rank}" if config.lora.rank else "full"
    print(
        f"training {what}: {trained:,} of {total:,} parameters; mesh {dict(mesh.shape)}; "
        f"{config.data.batch_size} x {config.data.seq_len} tokens per step; "
        f"capacity factor {c.capacity_factor}; {config.steps} steps",
        flush=True,
    )


def _export(train_step, state, tokenizer: Tokenizer, directory: Path) -> None:
    """The trained model (LoRA merged) as a checkpoint that `mixtral_jax.load` reads."""
    model = train_step.model(state)
    if model.config.lora_rank:  # merged a layer at a time as it is written
        config, slices = lora.merged_slices(model)
    else:
        config, slices = model.config, store.layer_slices(flat_params(model), model.config)
    if directory.exists():  # the same command run again after the last step: export anew
        if jax.process_index() == 0:
            shutil.rmtree(directory)
        multihost_utils.sync_global_devices("mixtral_jax export")
    store.save_slices(directory, slices, config)
    if jax.process_index() == 0:
        (directory / "tokenizer.model").write_bytes(tokenizer.sp.serialized_model_proto())
        print(f"exported the model to {directory}", flush=True)


USAGE = (
    "python -m mixtral_jax.train --config configs/finetune_tiny.py --workdir DIR "
    "[--config.key=value ...]"
)


def main(argv: Sequence[str] | None = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "a configs/finetune_*.py file", flag_values=flag_values
    )
    flags.DEFINE_string(
        "workdir",
        None,
        "the run's directory; resumes if it holds checkpoints",
        flag_values=flag_values,
    )
    full_argv = ["mixtral_jax.train", *(sys.argv[1:] if argv is None else argv)]
    saved_argv, sys.argv = sys.argv, full_argv  # config_flags reads overrides from sys.argv
    try:
        flag_values(full_argv)
    except flags.Error as e:
        print(f"error: {e}\nusage: {USAGE}", file=sys.stderr)
        return 2
    except (KeyError, AttributeError) as e:  # an override of a field the config lacks
        hint = re.search(r'Did you mean "([\w.]+)" instead of "([\w.]+)"', str(e))
        bare = str(e).replace('"', "").replace("'", "")
        message = f"'{hint[2]}'; did you mean '{hint[1]}'?" if hint else f"'{bare}'"
        print(f"error: no such config field {message}\nusage: {USAGE}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
    if flag_values.config is None or flag_values.workdir is None:
        print(f"error: --config and --workdir are required\nusage: {USAGE}", file=sys.stderr)
        return 2
    distributed.initialize()  # several hosts: $MIXTRAL_COORDINATOR_ADDRESS etc.
    try:
        train(flag_values.config, flag_values.workdir)
    except (ConfigError, data.DataError, store.CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
