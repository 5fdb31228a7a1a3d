"""PyTorch checkpoints -> mixtral_jax checkpoints (and back), streaming and atomic.

The CLI is `tools/convert.py`; these functions do the work. A conversion writes
into a temporary directory beside the output and renames it into place only
when complete and (optionally) verified, so a crash, an error or Ctrl-C never
leaves something that looks like a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mixtral_jax.checkpoints import hub, sources, store
from mixtral_jax.model.config import DTYPES, QUANTIZATIONS, ConfigError, ModelConfig
from mixtral_jax.model.mixtral import param_shapes
from mixtral_jax.quant.quantize import quantize_slice


class ConvertError(ValueError):
    """Bad arguments for a conversion (existing output, unknown dtype ...)."""


class Progress:
    """A one-line progress report on stderr: bytes done of total, rate, tensors."""

    def __init__(self, total_bytes: int, label: str, stream=sys.stderr):
        self.total, self.label, self.stream = total_bytes, label, stream
        self.done = self.tensors = 0
        self.start = self.last = time.perf_counter()

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        self.tensors += 1
        if time.perf_counter() - self.last > 0.5:
            self._show()

    def finish(self) -> None:
        self.done = self.total  # file headers are not tensors: the last bytes read
        self._show()
        self.stream.write("\n")

    def _show(self) -> None:
        now = self.last = time.perf_counter()
        pct = 100 * self.done / max(self.total, 1)
        rate = self.done / max(now - self.start, 1e-9) / 1e9
        self.stream.write(
            f"\r{self.label}: {pct:5.1f}% {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB, "
            f"{rate:.2f} GB/s, {self.tensors} tensors"
        )
        self.stream.flush()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


@contextlib.contextmanager
def staged_output(output: Path, force: bool) -> Iterator[Path]:
    """A temporary directory that becomes `output` only if the block succeeds."""
    if output.exists() and not force:
        raise ConvertError(f"{output} already exists; pass --force to replace it")
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    for stale in output.parent.glob(f".{output.name}.partial-*"):
        if not _alive(stale.name.rsplit("-", 1)[-1]):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        _remove(staging)
        raise
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _remove(directory: Path, patience_s: float = 30.0) -> None:
    """Deletes `directory`, again until it stays gone: an interrupted Orbax save may
    still be finishing a write from its background thread."""
    deadline = time.monotonic() + patience_s
    while True:
        shutil.rmtree(directory, ignore_errors=True)
        time.sleep(0.2)
        if not directory.exists() or time.monotonic() > deadline:
            return


def convert(
    source_dir: str | Path,
    output_dir: str | Path,
    dtype: str = "bfloat16",
    force: bool = False,
    verify: bool = False,
    quiet: bool = False,
    quantize: str | None = None,
    group_size: int = 128,
) -> dict:
    """Converts a Hugging Face / Mistral / mistral-inference checkpoint. Returns a summary.

    `quantize` ("int8" | "int4") stores the projections and experts quantized
    (`mixtral_jax.quant`), each slice quantized as it streams past; `dtype` is
    then that of the weights that stay float (router, norms, embedding, LM head)."""
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ConvertError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZATIONS)}")
    source = sources.open_source(source_dir)
    try:
        config = source.config.replace(
            param_dtype=dtype, dtype=dtype, quantization=quantize, quant_group_size=group_size
        )
    except ConfigError as e:
        raise ConvertError(f"--quantize {quantize} --group_size {group_size}: {e}") from None
    output = Path(output_dir)
    stream = open(os.devnull, "w") if quiet else sys.stderr  # noqa: SIM115
    with staged_output(output, force) as staging:
        progress = Progress(source.num_bytes, f"converting {source.layout}", stream)
        count = _write(source, config, staging, progress)
        progress.finish()
        store.write_config(staging, config, dtype)
        _copy_tokenizer(Path(source_dir), staging)
        summary = {
            "layout": source.layout,
            "parameters": count,
            "bytes": _stored_bytes(staging),
            "seconds": progress.seconds,
            "gb_per_s": source.num_bytes / max(progress.seconds, 1e-9) / 1e9,
        }
        if verify:
            summary["verified_tensors"] = verify_against_source(staging, source, config)
    if not quiet:
        print(
            f"wrote {output}: {summary['parameters']:,} parameters, "
            f"{summary['bytes'] / 1e9:.2f} GB on disk ({quantize or dtype}), "
            f"{summary['seconds']:.1f} s, "
            f"{summary['gb_per_s']:.2f} GB/s read"
            + (f"; verified {summary['verified_tensors']} tensors bit for bit" if verify else "")
        )
    return summary


def _copy_tokenizer(source: Path, destination: Path) -> None:
    if (source / "tokenizer.model").is_file():
        shutil.copy(source / "tokenizer.model", destination / "tokenizer.model")


def _stored_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def _write(source: sources.Source, config: ModelConfig, directory: Path, progress: Progress) -> int:
    """Streams the source into `directory` in `config.param_dtype` (quantized as the
    config says); returns the parameter count."""
    float_config = config.replace(quantization=None)
    shapes = param_shapes(float_config)
    writer = store.LayerWriter(directory, config, config.weight_dtype)
    coverage = hub.Coverage(float_config, shapes)
    count = 0
    for key, tensor in source.tensors():
        for s in hub.hub_to_slices(key, tensor, config, shapes):
            coverage.add(key, s)
            writer.add(s.path, s.index, s.value)
            count += s.value.size
        progress.update(tensor.nbytes)
    coverage.check()
    writer.finish()
    return count


def verify_against_source(directory: Path, source: sources.Source, config: ModelConfig) -> int:
    """Re-reads the written checkpoint and compares every tensor with the source, exactly
    (after casting the source to `config.param_dtype`, or quantizing it as the config
    says). Returns the tensors compared."""
    float_config = config.replace(quantization=None)
    shapes = param_shapes(float_config)
    written = store.Stored.of(config, config.param_dtype)
    cached_layer, cached = None, None
    other = store.read_other(directory, written)
    compared = 0
    for key, tensor in source.tensors():
        for s in hub.hub_to_slices(key, tensor, float_config, shapes):
            if s.path[0] == "layers":
                layer = s.index[0]
                if layer != cached_layer:
                    cached = store.read_layer(directory, layer, written)
                    cached_layer = layer
            for path, value in quantize_slice(config, s.path, s.value).items():
                expected = np.ascontiguousarray(np.asarray(value).astype(written.dtypes[path]))
                stored = cached[path][s.index[1:]] if path[0] == "layers" else other[path]
                stored = np.ascontiguousarray(stored)
                if stored.shape != expected.shape or stored.tobytes() != expected.tobytes():
                    raise store.CheckpointError(
                        f"verification failed: {key} differs in the written checkpoint"
                    )
            compared += 1
    return compared


def export_hf(
    checkpoint_dir: str | Path, output_dir: str | Path, force: bool = False, quiet: bool = False
) -> None:
    """Writes Hub-layout safetensors shards (one per layer) and config.json."""
    import json

    config, dtype = store.read_config(checkpoint_dir)
    if config.quantization is not None:
        raise ConvertError(
            f"{checkpoint_dir} is quantized ({config.quantization}); the Hub layout has no "
            "integer weights: export the float checkpoint it was converted from"
        )
    output = Path(output_dir)
    rules = {}
    for key, rule, index in hub.hub_keys(config):
        rules.setdefault(index[0] if rule.path[0] == "layers" else None, []).append(
            (key, rule, index)
        )
    n = config.num_layers + 1
    with staged_output(output, force) as staging:
        weight_map = {}
        for i, (layer, params) in enumerate(store.read_layers(checkpoint_dir)):
            tensors = {}
            for key, rule, index in rules[layer]:
                # index is (layer[, expert]) or () outside the layers: drop the layer.
                tensors[key] = hub.slice_to_hub(rule, params[rule.path][index[1:]])
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            sources.write_safetensors(staging / name, tensors)
            weight_map.update(dict.fromkeys(tensors, name))
        index = {"metadata": {"format": "pt"}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf_config = config.to_hf() | {"torch_dtype": dtype, "dtype": dtype}
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2))
        _copy_tokenizer(Path(checkpoint_dir), staging)
    if not quiet:
        print(f"wrote {output} ({n} safetensors shards)")
