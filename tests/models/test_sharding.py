"""Greedy decoding on a simulated 8-device CPU mesh gives the single-device tokens."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from models import sharding
from models.config import tiny_config
from models.transformer import fuse_projections, init_params
from tests import REPO

SCRIPT = textwrap.dedent("""
    import dataclasses, json, sys
    import jax
    from decoding.greedy import Greedy
    from decoding.runner import generate
    from decoding.strategy import Target
    from models import sharding
    from models.lm import load_model
    assert len(jax.devices()) == 8, jax.devices()
    m = load_model()
    tok = m.tokenizer
    texts = ["The capital of France is", "def add(a, b):", "Once upon a time",
             "Water boils at", "1, 2, 3, 4,", "The sun is a", "My favourite food is",
             "In 1969, humans"]
    prompts = [tok.encode(t) for t in texts]
    settings = Greedy(max_new_tokens=12, min_new_tokens=12)
    single = generate(Target(m.lm, m.params, (2,), 2), prompts, settings)
    mesh = sharding.make_mesh(data=4, model=2)
    params = sharding.shard_params(m.params, mesh)
    lm = dataclasses.replace(m.lm, mesh=mesh)
    specs = {k: str(v.sharding.spec) for k, v in
             [("q", params["layers_0"]["attn"]["qkv_proj"]["kernel"]),
              ("embed", params["embed"]["table"])]}
    sharded = generate(Target(lm, params, (2,), 2), prompts, settings,
                       shard=lambda a: sharding.shard_batch(a, mesh))
    print(json.dumps(dict(single=[g.output_ids for g in single],
                          sharded=[g.output_ids for g in sharded], specs=specs)))
""")


@pytest.mark.slow
@pytest.mark.usefixtures("smollm_gguf")  # the subprocess loads it
def test_sharded_greedy_equals_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  assert res["specs"]["q"] == str(P(None, "model"))  # the default layout: per layer, fused
  assert res["specs"]["embed"] == str(P(None, "model"))
  assert res["sharded"] == res["single"]


def test_partition_rules_fall_back_when_not_divisible():
  devs = jax.devices()[:1]
  mesh = sharding.make_mesh(1, 1, devs)
  c = tiny_config()
  specs = sharding.param_specs(init_params(c, jax.random.PRNGKey(0)), mesh)
  assert specs["layers"]["mlp"]["down_proj"]["kernel"] == P(None, "model", None)
  fused = sharding.param_specs(fuse_projections(init_params(c, jax.random.PRNGKey(0))), mesh)
  assert fused["layers"]["attn"]["qkv_proj"]["kernel"] == P(None, None, "model")
  assert fused["layers"]["mlp"]["gate_up_proj"]["kernel"] == P(None, None, "model")
  # Cache [L, B, Hkv, T, hd]: batch over data, KV heads over model (sizes 1 always divide).
  assert sharding.cache_spec((2, 3, 2, 16, 4), mesh) == P(None, "data", "model", None, None)
  with pytest.raises(ValueError, match="needs 4 devices"):
    sharding.make_mesh(2, 2, devs)
