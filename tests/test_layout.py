"""The package's layout: imports flow one way, from higher rooms to lower ones, with no
cycle between modules (not even inside a function), and nothing imports a command."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mixtral_jax"
# Lowest first: a room may import itself and the rooms before it, never one after it.
ROOMS = (
    "params",
    "cli",
    "parallel",
    "model",
    "quant",
    "checkpoints",
    "backends",
    "inference",
    "training",
    "analysis",
    "planning",
    "__init__",  # the public API
)
COMMANDS = ("generate", "train", "evaluate", "routing", "serve")  # python -m mixtral_jax.NAME


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules `path` imports anywhere in it (functions included)."""
    found = set()
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    )
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            # `from pkg import mod` imports the module; `from pkg import name`, the package.
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) - {module_name(p)} for p in paths}


def room(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_no_module_import_cycle():
    edges = graph()
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycle = trail[trail.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_rooms_import_only_lower_rooms():
    rank = {name: i for i, name in enumerate(ROOMS)}
    upward = [
        f"{module} ({room(module)}) imports {target} ({room(target)})"
        for module, targets in graph().items()
        if room(module) not in COMMANDS
        for target in targets
        if room(target) not in COMMANDS and rank[room(target)] > rank[room(module)]
    ]
    assert not upward, "\n".join(upward)


def test_every_module_lives_in_a_room_and_nothing_imports_a_command():
    edges = graph()
    assert {room(m) for m in edges} <= set(ROOMS) | set(COMMANDS)
    commands = {f"mixtral_jax.{c}" for c in COMMANDS}
    assert commands <= set(edges)  # the `python -m` names
    importers = [(m, t) for m, targets in edges.items() for t in targets if t in commands]
    assert not importers


def test_the_model_imports_no_checkpoint_inference_training_or_backend():
    model = {m: t for m, t in graph().items() if room(m) == "model"}
    assert model
    assert all(room(t) in ("params", "parallel", "model") for ts in model.values() for t in ts)


def test_the_check_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a package with a cycle and an upward import is caught."""
    package = tmp_path / "mixtral_jax"
    for name, source in {
        "__init__.py": "",
        "model/__init__.py": "",
        "model/a.py": "from mixtral_jax.model import b\n",
        "model/b.py": "def f():\n    from mixtral_jax.model.a import x\n",
        "inference/__init__.py": "",
        "inference/c.py": "",
        "parallel/__init__.py": "",
        "parallel/d.py": "import mixtral_jax.inference.c\n",
    }.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(source)
    monkeypatch.setitem(globals(), "PACKAGE", package)  # the checks read PACKAGE
    try:
        test_no_module_import_cycle()
    except AssertionError as e:
        assert "mixtral_jax.model.a -> mixtral_jax.model.b -> mixtral_jax.model.a" in str(e)
    else:
        raise AssertionError("the cycle was not seen")
    try:
        test_rooms_import_only_lower_rooms()
    except AssertionError as e:
        assert "mixtral_jax.parallel.d (parallel) imports mixtral_jax.inference.c" in str(e)
    else:
        raise AssertionError("the upward import was not seen")
