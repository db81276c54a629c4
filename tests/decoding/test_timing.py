"""Compile time is told apart from decode time, and the CLI reports speed (and tau)."""
from __future__ import annotations

import io
import json

import jax
import jax.numpy as jnp
import numpy as np

from configs import generate as generate_config
from decoding import generate as cli
from decoding.greedy import Greedy
from decoding.runner import generate
from decoding.speculative.strategy import Speculative
from decoding.timing import Stopwatch, speed_report
from models.config import tiny_config
from models.lm import LoadedModel, TransformerLM
from models.transformer import init_params
from tests.fakes import BigramLM
from tests.helpers import target


def test_a_cache_miss_counts_as_compile_time_and_a_hit_does_not():
  f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
  x = jnp.ones((37, 29))
  with Stopwatch() as first:
    f(x).block_until_ready()
  with Stopwatch() as second:
    f(x).block_until_ready()
  assert first.compile_s > 0 and first.compile_s <= first.wall_s
  assert second.compile_s == 0 and second.decode_s == second.wall_s


def test_a_reentered_stopwatch_accumulates_and_nested_ones_both_count():
  watch = Stopwatch()
  for n in (11, 13):  # two shapes: two compiles
    with watch, Stopwatch() as inner:
      jax.jit(lambda x: x * 2)(jnp.ones((n,))).block_until_ready()
    assert inner.compile_s > 0
  assert watch.compile_s >= inner.compile_s and watch.wall_s >= watch.compile_s


def test_speed_report_counts_tokens_and_tau_is_verified_tokens_per_target_call():
  V = 8
  rng = np.random.default_rng(0)
  params = jnp.asarray(rng.normal(size=(V, V)) * 3, jnp.float32)
  t = target(BigramLM(V), params)
  prompts = [[1, 2, 3], [4, 5]]
  with Stopwatch() as watch:
    gens = generate(t, prompts, Speculative(drafter="prompt_lookup", max_new_tokens=9,
                                            min_new_tokens=9))
  report = speed_report(gens, watch)
  assert report.new_tokens == 18
  calls = sum(g.extras["target_calls"] for g in gens)
  verified = sum(g.extras["verified_tokens"] for g in gens)
  # each row's first token comes from the prefill's logits, every other one from a target call
  assert verified == 18 - 2 and report.tau == verified / calls
  greedy = speed_report(generate(t, prompts, Greedy(max_new_tokens=4)), watch)
  assert greedy.tau is None and "tau" not in greedy.line()


def test_the_cli_prints_compile_and_decode_time_and_tau_on_stderr(tmp_path, monkeypatch):
  config = tiny_config(vocab_size=64)
  model = LoadedModel("tiny", TransformerLM(config), init_params(config, jax.random.PRNGKey(0)),
                      None, False, None)
  monkeypatch.setattr(cli, "load", lambda cfg: (model, None))
  inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  inp.write_text(json.dumps({"prompt_ids": [3, 4, 5, 3, 4]}) + "\n")
  cfg = generate_config.get_config()
  cfg.model = "smollm2-135m-instruct"  # a registered name passes the check; `load` is faked
  cfg.strategy, cfg.drafter, cfg.max_new_tokens, cfg.min_new_tokens = ("speculative",
                                                                      "prompt_lookup", 6, 6)
  err = io.StringIO()
  cli.run(cfg, None, str(inp), str(outp), err=err)
  line = err.getvalue().strip().splitlines()[-1]
  assert line.startswith("speed: 6 new tokens in ") and "compile" in line and "decode" in line
  assert "tokens/s" in line and "tau" in line
  compile_s = float(line.split("compile ")[1].split(" s")[0])
  assert compile_s > 0  # the first run of a new shape compiles
  err = io.StringIO()
  cli.run(cfg, None, str(inp), str(outp), err=err)
  assert "compile 0.00 s" in err.getvalue()  # the same shapes again: nothing compiles
