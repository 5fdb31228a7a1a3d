"""Many LoRA adapters served at once: a batch mixes them, each row applying its own,
and every request gets what its adapter merged into the base gives it alone."""

from __future__ import annotations

import httpx
import jax
import numpy as np
import pytest
from flax import nnx

import mixtral_jax
from mixtral_jax.checkpoints.adapters import load_bank
from mixtral_jax.inference.engine import Engine
from mixtral_jax.inference.generate import generate_tokens
from mixtral_jax.inference.requests import Request, RequestError
from mixtral_jax.inference.serve_cli import lora_flags
from mixtral_jax.inference.server import create_app
from mixtral_jax.model.layers import LoRAParam
from mixtral_jax.training import lora
from tests import run_script
from tests.serving import NAME, openai_client, running_server

# Adapters of different ranks, alphas and targets, as different fine-tuning runs make.
ADAPTERS = {
    "sql": (8, 16.0, ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")),
    "chat": (4, 8.0, ("q_proj", "v_proj")),
    "docs": (8, 32.0, ("w1", "w2", "w3")),
}
PROMPTS = ["def fibonacci(n):", "class Stack:", "import os\n", "for i in range(", "    return"]


def trained_like(model, seed: int):
    """`model`'s adapters with random B factors, as large as training makes them (a fresh
    adapter's B is zero: it changes nothing)."""
    state = nnx.state(model, LoRAParam)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(tree, noisy))
    return model


@pytest.fixture(scope="module")
def base():
    # float32 weights: merging an adapter into them rounds nothing away.
    return mixtral_jax.load(dtype="float32")


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """Each adapter's directory (as a LoRA run writes it) and its merged model."""
    root = tmp_path_factory.mktemp("adapters")
    dirs, merged = {}, {}
    for seed, (name, (rank, alpha, targets)) in enumerate(ADAPTERS.items()):
        adapted = lora.add_adapters(base, rank=rank, alpha=alpha, targets=targets, seed=seed)
        adapted = trained_like(adapted, seed)
        lora.save_adapters(adapted, root / name)
        dirs[name], merged[name] = root / name, lora.merge(adapted)
    return dirs, merged


@pytest.fixture(scope="module")
def engine(base, adapters):
    bank = load_bank(base, adapters[0])
    # A paged cache with prefix caching: equal prompts under different adapters must not
    # share their blocks.
    engine = Engine(bank, max_batch=4, max_len=128, prefill_chunk=32, block_size=16)
    engine.warmup()
    return engine


def solo(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    return generate_tokens(model, prompts, max_new_tokens=max_tokens)[0]


def test_mixed_batches_equal_each_adapter_merged(engine, base, adapters, embedded_tokenizer):
    """36 requests, the same prompts under every adapter and none, through 4 slots."""
    names = [None, *ADAPTERS]
    prompts = [embedded_tokenizer.encode(p) for p in PROMPTS + ["x = [", "while True:"]]
    prompts += [embedded_tokenizer.encode("import json\n" * 3 + "def load(path):")]
    requests = [
        Request(prompt, 12 + i % 7, adapter=None if name is None else names.index(name) - 1)
        for i, prompt in enumerate(prompts)
        for name in names
    ] + [Request(prompts[0], 5, adapter=i % 3) for i in range(4)]
    got: dict[str, list[int]] = {}
    for r in requests:
        r.on_output = lambda o: got.setdefault(o.request_id, []).extend(o.tokens)
    pending = list(requests)
    while pending or engine.busy():
        for _ in range(min(len(pending), 3)):
            engine.submit(pending.pop(0))
        engine.step()
    models = [base, *(adapters[1][name] for name in ADAPTERS)]
    expected = {id(m): solo(m, prompts, 20) for m in models}
    answers = {}
    for r in requests:
        model = models[0 if r.adapter is None else r.adapter + 1]
        want = expected[id(model)][prompts.index(r.prompt)][: r.max_tokens]
        assert got[r.id] == want, (r.adapter, r.prompt)
        answers.setdefault(r.adapter, []).append(tuple(got[r.id]))
    # The adapters change the answers: a row applying another's would show.
    assert len({tuple(a) for a in answers.values()}) == len(names)


def test_equal_prompts_share_cached_blocks_only_under_one_adapter(engine, adapters):
    pool = engine.scheduler.pool
    prompt = list(range(100, 140))  # two full blocks of 16 before its last token
    seen = []
    for adapter in (0, 1, 0, None):
        hits = pool.hit_tokens
        out: list[int] = []
        on_output = lambda o, out=out: out.extend(o.tokens)  # noqa: E731
        engine.submit(Request(prompt, 4, adapter=adapter, on_output=on_output))
        engine.run_until_idle()
        seen.append((pool.hit_tokens - hits, out))
    assert [hit for hit, _ in seen] == [0, 0, 32, 0]
    merged = adapters[1]
    assert seen[1][1] == solo(merged["chat"], [prompt], 4)[0]
    assert seen[2][1] == seen[0][1] == solo(merged["sql"], [prompt], 4)[0]


def test_unknown_adapters_are_refused(engine):
    with pytest.raises(RequestError, match="adapter 3 is not among this model's 3") as e:
        engine.submit(Request([1, 2, 3], 4, adapter=3))
    assert e.value.param == "model"


@pytest.fixture(scope="module")
def url(engine, embedded_tokenizer):
    with running_server(engine, embedded_tokenizer, adapters=list(ADAPTERS)) as url:
        yield url


def test_the_server_serves_each_adapter_as_a_model(url, base, adapters, embedded_tokenizer):
    client = openai_client(url)
    listed = client.models.list().data
    assert [m.id for m in listed] == [NAME, *ADAPTERS]
    assert all(m.parent == NAME for m in listed[1:])
    for name in (NAME, *ADAPTERS):
        model = base if name == NAME else adapters[1][name]
        expected = mixtral_jax.generate(model, embedded_tokenizer, PROMPTS, max_new_tokens=16)
        out = client.completions.create(model=name, prompt=PROMPTS, max_tokens=16, temperature=0)
        assert out.model == name
        assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == expected.texts
    chat = client.chat.completions.create(
        model="docs", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert chat.model == "docs" and chat.usage.completion_tokens == 4


def test_an_unknown_model_gets_a_400_naming_it(url):
    body = {"model": "nope", "prompt": "x", "max_tokens": 2}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "model"
    assert error["message"] == (
        f"model 'nope' is not served here; this server has '{NAME}', 'sql', 'chat', 'docs'"
    )


def test_bad_lora_flags_and_names_are_named(engine, embedded_tokenizer):
    assert lora_flags(["a=x", "b=y/z"], NAME) == {"a": "x", "b": "y/z"}
    with pytest.raises(ValueError, match="write NAME=DIR"):
        lora_flags(["runs/a"], NAME)
    with pytest.raises(ValueError, match="the name 'a' is taken"):
        lora_flags(["a=x", "a=y"], NAME)
    with pytest.raises(ValueError, match="taken"):
        lora_flags([f"{NAME}=x"], NAME)
    with pytest.raises(ValueError, match="2 adapter names for a bank of 3"):
        create_app(engine, embedded_tokenizer, NAME, adapters=["a", "b"])
    with pytest.raises(ValueError, match="must differ"):
        create_app(engine, embedded_tokenizer, NAME, adapters=["a", "b", "a"])
    np.testing.assert_equal(engine.model.config.lora_bank, 3)


MESH_SCRIPT = """
import json, sys, tempfile
import jax
import numpy as np
from flax import nnx
from configs import tiny
from mixtral_jax import Mixtral, ModelConfig
from mixtral_jax.checkpoints.adapters import load_bank
from mixtral_jax.inference.engine import Engine
from mixtral_jax.inference.requests import Request
from mixtral_jax.model.layers import LoRAParam
from mixtral_jax.parallel.mesh import make_mesh
from mixtral_jax.parallel.placement import shard_model
from mixtral_jax.training import lora

config = ModelConfig.from_dict(tiny.get_config())
root = tempfile.mkdtemp()
dirs = {}
for i in range(2):
    adapted = lora.add_adapters(Mixtral(config, rngs=nnx.Rngs(4)), rank=4, alpha=8.0,
                                targets=("q_proj", "v_proj", "w1", "w2", "w3"), seed=i)
    leaves, tree = jax.tree.flatten(nnx.state(adapted, LoRAParam))
    keys = jax.random.split(jax.random.key(i), len(leaves))
    nnx.update(adapted, jax.tree.unflatten(
        tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    lora.save_adapters(adapted, f"{root}/{i}")
    dirs[str(i)] = f"{root}/{i}"
rs = np.random.RandomState(9)
prompts = [rs.randint(3, config.vocab_size, rs.randint(1, 40)).tolist() for _ in range(9)]
prompts[1] = prompts[2] = prompts[0]  # under the base and each adapter
out = {}
for name, mesh in (("one", None), ("mesh", make_mesh(data=2, fsdp=1, tensor=2, expert=2))):
    model = Mixtral(config, rngs=nnx.Rngs(4))
    bank = load_bank(model, dirs)
    if mesh is not None:
        shard_model(bank, mesh)
    engine = Engine(bank, max_batch=4, max_len=64, prefill_chunk=16, mesh=mesh)
    tokens = {}
    for i, p in enumerate(prompts):
        sink = lambda o, i=i: tokens.setdefault(i, []).extend(o.tokens)
        engine.submit(Request(p, 10, adapter=(None, 0, 1)[i % 3], on_output=sink))
    engine.run_until_idle()
    out[name] = [tokens[i] for i in range(len(prompts))]
print(json.dumps(out))
"""


def test_a_bank_on_a_mesh_gives_the_unsharded_tokens():
    out = run_script(MESH_SCRIPT)
    assert out["mesh"] == out["one"]
    assert len({tuple(t) for t in out["one"][:3]}) == 3  # base and two adapters differ
