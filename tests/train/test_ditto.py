"""DITTO ("Learning to Break the Loop", Xu et al., NeurIPS 2022): data, loss and measurements."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import transformer
from models.config import tiny_config
from models.lm import TransformerLM
from tests.fakes import BigramLM
from train import ditto, evaluation, losses

V = 32
END = np.zeros((V,), bool)
END[[1, 2]] = True  # ids 1 and 2 play '.' and '!'; 3..31 are words; 0 is padding


def _doc(rng, n_sentences=6, lo=4, hi=8):
  out = []
  for _ in range(n_sentences):
    out += rng.integers(3, V, int(rng.integers(lo, hi))).tolist() + [int(rng.integers(1, 3))]
  return out


DOCS = [_doc(np.random.default_rng(i)) for i in range(48)]
T = 48


@pytest.fixture(scope="module")
def tiny():
  config = tiny_config()
  return config, transformer.init_params(config, jax.random.PRNGKey(0))


def _jnp(batch):
  return {k: jnp.asarray(v) for k, v in batch.items()}


# ------------------------------------------------------------------------------ segmentation


class _FakeTokenizer:
  def __init__(self, texts, special=()):
    self.texts, self.vocab_size, self.special_ids = texts, len(texts), set(special)

  def decode(self, ids):
    return "".join(self.texts[i] for i in ids)


def test_sentence_end_ids_rules():
  texts = ["a", ".", "!", " ?", "Mr.", '."', ")", " end.\n", "<eos>.", "...", ",", " the"]
  table = ditto.sentence_end_ids(_FakeTokenizer(texts, special=[8]), vocab_size=14)
  assert table.shape == (14,) and table.dtype == bool
  expected = [False, True, True, True, True, True, False, True, False, True, False, False,
              False, False]
  np.testing.assert_array_equal(table, expected)


def test_sentence_end_ids_smollm_tokenizer(smollm_tokenizer):
  """One cheap real-vocabulary check (SmolLM2's tokenizer only)."""
  tok = smollm_tokenizer
  table = ditto.sentence_end_ids(tok)
  ids = tok.encode("It rains. Does it? Yes! The end", add_special_tokens=False)
  spans = ditto.split_sentences(ids, table)
  assert [tok.decode(ids[a:b]) for a, b in spans] == ["It rains.", " Does it?", " Yes!"]
  assert not table[sorted(tok.special_ids)].any()


def test_split_sentences():
  toks = [5, 6, 1, 7, 2, 8, 9, 10, 1, 11, 12]
  np.testing.assert_array_equal(ditto.split_sentences(toks, END), [[0, 3], [3, 5], [5, 9]])
  assert ditto.split_sentences([5, 6], END).shape == (0, 2)
  with pytest.raises(ValueError):
    ditto.split_sentences([V], END)


# ------------------------------------------------------------------------------------ data


def _check_row(row, seq_len):
  tok, prev, copy = row["tokens"], row["prev_index"], row["copy_index"]
  assert tok.shape == prev.shape == copy.shape == (seq_len,)
  assert tok.dtype == prev.dtype == copy.dtype == np.int32
  P = int((copy == 0).sum())
  L = int((copy == 1).sum())
  assert P >= 1 and L >= 4 and copy.max() >= 2
  np.testing.assert_array_equal(copy[:P], 0)
  np.testing.assert_array_equal(copy[P:], 1 + (np.arange(seq_len - P) // L))
  # every copy (the last one possibly cut) equals the first
  s = tok[P:P + L]
  for n in range(2, copy.max() + 1):
    seg = tok[copy == n]
    np.testing.assert_array_equal(seg, s[:len(seg)])
  # prev_index: -1 on the prefix and the first copy, else the same token one copy back
  np.testing.assert_array_equal(prev[copy <= 1], -1)
  pos = np.flatnonzero(prev >= 0)
  np.testing.assert_array_equal(pos, np.flatnonzero(copy >= 2))
  np.testing.assert_array_equal(prev[pos], pos - L)
  np.testing.assert_array_equal(tok[prev[pos]], tok[pos])
  np.testing.assert_array_equal(copy[prev[pos]], copy[pos] - 1)


def _from_doc(row, doc):
  """Whether the prefix and the first copy are two consecutive sentences of `doc`."""
  P = int((row["copy_index"] == 0).sum())
  L = int((row["copy_index"] == 1).sum())
  spans = ditto.split_sentences(doc, END)
  return any(list(row["tokens"][:P]) == doc[a:b] and list(row["tokens"][P:P + L]) == doc[b:c]
             for (a, b), (_, c) in zip(spans[:-1], spans[1:]))


def test_repetition_example_invariants():
  for seed in range(20):
    doc = DOCS[seed]
    row = ditto.repetition_example(doc, END, T, seed)
    _check_row(row, T)
    assert _from_doc(row, doc)
    again = ditto.repetition_example(doc, END, T, np.random.default_rng(seed))
    for k in row:
      np.testing.assert_array_equal(row[k], again[k])
  # sentences too long to fit twice, or no previous sentence: nothing to build
  assert ditto.repetition_example(DOCS[0], END, 8, 0) is None
  assert ditto.repetition_example([5, 6, 7, 8, 1], END, T, 0) is None
  assert ditto.repetition_example(DOCS[0], END, T, 0, min_sentence_len=20) is None
  row = ditto.repetition_example(DOCS[0], END, T, 0, min_sentence_len=6, max_sentence_len=6)
  assert (row["copy_index"] == 1).sum() == 6


def test_build_repetition_batch():
  bad = [5, 6, 7]  # no sentence at all: its row comes from a usable document
  docs = DOCS[:5] + [bad]
  batch = ditto.build_repetition_batch(docs, END, T, rng=3, batch_size=8)
  assert set(batch) == {"tokens", "prev_index", "copy_index"}
  for k, v in batch.items():
    assert v.shape == (8, T) and v.dtype == np.int32, k
  for r in range(8):
    row = {k: v[r] for k, v in batch.items()}
    _check_row(row, T)
    if r != 5:
      assert _from_doc(row, docs[r % 6])
    else:
      assert any(_from_doc(row, d) for d in DOCS[:5])
  again = ditto.build_repetition_batch(docs, END, T, rng=np.random.default_rng(3), batch_size=8)
  other = ditto.build_repetition_batch(docs, END, T, rng=4, batch_size=8)
  for k in batch:
    np.testing.assert_array_equal(batch[k], again[k])
  assert not np.array_equal(batch["tokens"], other["tokens"])
  with pytest.raises(ValueError):
    ditto.build_repetition_batch([bad], END, T, rng=0)


# ------------------------------------------------------------------------------------ loss


def _np_ditto(logits, tokens, prev, gamma, variant):
  """The formula, written out token by token in numpy (float64)."""
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  B, T_ = tokens.shape
  prob = np.zeros((B, T_))
  for b in range(B):
    for t in range(1, T_):
      prob[b, t] = np.exp(logp[b, t - 1, tokens[b, t]])
  total, count = 0.0, 0
  for b in range(B):
    for t in range(T_):
      if prev[b, t] < 0:
        continue
      p, base = prob[b, t], prob[b, prev[b, t]]
      d = p - gamma * base
      if variant == "nl":
        term = -np.log(max(1 - abs(d), 1e-20))
      elif variant == "mse":
        term = d * d
      else:
        term = -np.log(max(1 - max(d, 0.0), 1e-20))
      total, count = total + term, count + 1
  return total / count


@pytest.mark.parametrize("variant", ditto.VARIANTS)
def test_loss_matches_formula_on_tiny_model(tiny, variant):
  config, params = tiny
  # 8 x 48: the shape `self_reinforcement_curve` uses below, so the forward compiles once
  batch = _jnp(ditto.build_repetition_batch(DOCS[:8], END, T, rng=0))
  loss, metrics = ditto.ditto_loss(config, 0.7, variant)(params, batch, jax.random.PRNGKey(0))
  logits = losses.sequence_logits(params, config, batch["tokens"])
  tokens, prev = np.asarray(batch["tokens"]), np.asarray(batch["prev_index"])
  expected = _np_ditto(logits, tokens, prev, 0.7, variant)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-9)
  assert float(metrics["ditto"]) == float(loss)
  assert float(metrics["tokens"]) == (prev >= 0).sum()
  p = np.exp(np.asarray(losses.token_logprobs(logits, batch["tokens"])))
  np.testing.assert_allclose(float(metrics["p_repeat"]), p[prev >= 0].mean(), rtol=1e-5)


@pytest.mark.parametrize("variant", ditto.VARIANTS)
def test_loss_matches_formula_on_peaked_logits(variant):
  """Sharp logits, so p - gamma * baseline takes both signs (exercises nl_clip's clip)."""
  rng = np.random.default_rng(1)
  batch = ditto.build_repetition_batch(DOCS[:3], END, 40, rng=1)
  logits = rng.normal(size=(3, 40, V)).astype(np.float32) * 4
  for gamma in (0.5, 1.0):
    loss, _ = ditto.ditto_loss_from_logits(jnp.asarray(logits), _jnp(batch), gamma, variant)
    expected = _np_ditto(logits, batch["tokens"], batch["prev_index"], gamma, variant)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-9)
  p, base, mask = (np.asarray(x) for x in ditto.repetition_probs(
      jnp.asarray(logits), jnp.asarray(batch["tokens"]), jnp.asarray(batch["prev_index"])))
  d = (p - 0.5 * base)[mask > 0]
  assert (d > 0).any() and (d < 0).any()


def test_invalid_arguments():
  config = tiny_config()
  for kwargs in ({"variant": "ul"}, {"gamma": 0.0}, {"gamma": 1.5}, {"gamma": -0.5}):
    with pytest.raises(ValueError):
      ditto.ditto_loss(config, **kwargs)
  ditto.ditto_loss(config, gamma=1.0)
  with pytest.raises(ValueError):
    ditto.ditto_mle_mixture(config, ditto_rate=1.5)
  with pytest.raises(ValueError):
    ditto.ditto_mle_mixture(config, variant="nope")


def _logits_case(seed=0):
  rng = np.random.default_rng(seed)
  batch = _jnp(ditto.build_repetition_batch(DOCS[:3], END, 40, rng=seed))
  logits = jnp.asarray(rng.normal(size=(3, 40, V)).astype(np.float32) * 3)
  return batch, logits


@pytest.mark.parametrize("variant", ditto.VARIANTS)
def test_no_gradient_through_baseline(variant):
  batch, logits = _logits_case()
  loss = lambda lg: ditto.ditto_loss_from_logits(lg, batch, 0.5, variant)[0]
  _, base0, mask = ditto.repetition_probs(logits, batch["tokens"], batch["prev_index"])
  const = jnp.asarray(np.asarray(base0))  # same values, no connection to the logits

  def with_baseline(lg, baseline_of):
    p, _, m = ditto.repetition_probs(lg, batch["tokens"], batch["prev_index"])
    return losses.masked_mean(ditto.ditto_penalty(p, baseline_of(lg, p), 0.5, variant), m)

  def live(lg, p):  # the baseline WITH a gradient, to show the test can tell
    prev = batch["prev_index"]
    return jnp.where(prev >= 0, jnp.take_along_axis(p, jnp.maximum(prev, 0), axis=1), 0.0)

  g = jax.grad(loss)(logits)
  g_const = jax.grad(lambda lg: with_baseline(lg, lambda lg, p: const))(logits)
  g_live = jax.grad(lambda lg: with_baseline(lg, live))(logits)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(g_const))
  assert np.abs(np.asarray(g) - np.asarray(g_live)).max() > 1e-4
  g_base = jax.grad(lambda lg: ditto.repetition_probs(lg, batch["tokens"],
                                                      batch["prev_index"])[1].sum())(logits)
  assert not np.asarray(g_base).any()


def test_prefix_and_first_copy_get_no_loss():
  """No gradient reaches the logits that predict prefix or first-copy tokens."""
  batch, logits = _logits_case(2)
  g = np.asarray(jax.grad(lambda lg: ditto.ditto_loss_from_logits(lg, batch)[0])(logits))
  prev = np.asarray(batch["prev_index"])
  predicts = np.zeros(prev.shape, bool)  # logits row t predicts token t + 1
  predicts[:, :-1] = prev[:, 1:] >= 0
  assert not g[~predicts].any()
  assert (np.abs(g[predicts]).sum(-1) > 0).all()
  # and the per-token penalties there are excluded by the mask
  _, _, mask = ditto.repetition_probs(logits, batch["tokens"], batch["prev_index"])
  np.testing.assert_array_equal(np.asarray(mask) > 0, prev >= 0)


def test_mixture_picks_ditto_at_rate(tiny):
  config, params = tiny
  d = _jnp(ditto.build_repetition_batch(DOCS[:2], END, 32, rng=0))
  batch = {"ditto": d, "mle": {"tokens": d["tokens"]}}
  mix = ditto.ditto_mle_mixture(config, 0.5, "nl", ditto_rate=0.3)
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  branch = jax.jit(jax.vmap(lambda k: mix(params, batch, k)[1]["branch"]))(keys)
  frac_ditto = float(np.mean(np.asarray(branch) == 0))  # sorted names: 0 = ditto, 1 = mle
  assert abs(frac_ditto - 0.3) < 0.04
  loss, metrics = mix(params, batch, keys[int(np.argmax(np.asarray(branch) == 0))])
  assert float(metrics["ditto/ditto"]) == float(loss) and np.isnan(float(metrics["mle/nll"]))


# ----------------------------------------------------------------------------- measurement


def test_sentence_repetition_rate():
  rows = [[5, 6, 1, 7, 1, 5, 6, 1, 5, 6, 1, 9],  # 4 sentences, 2 repeat "5 6 ."
          [3, 4, 2, 3, 4, 1, 3, 4, 2]]  # "3 4 !" then "3 4 ." differs, then "3 4 !" repeats
  assert ditto.sentence_repetition_rate(rows, END) == pytest.approx(3 / 7)
  assert ditto.sentence_repetition_rate([[5, 6]], END) == 0.0
  assert ditto.sentence_repetition_rate(np.array([[5, 1, 5, 1]]), END) == 0.5


def test_greedy_continuations_and_their_repetition_rate():
  """A bigram LM that cycles 3 -> 4 -> 5 -> '.' -> 3 loops on one sentence under greedy."""
  table = np.full((V, V), -5.0, np.float32)
  for a, b in ((3, 4), (4, 5), (5, 1), (1, 3), (7, 3), (9, 2)):
    table[a, b] = 5.0
  lm, params = BigramLM(V), jnp.asarray(table)
  outs = evaluation.greedy_continuations(lm, params, np.array([[7, 3], [7, 3]]),
                                         max_new_tokens=12, batch_size=2)
  assert outs.tolist() == [[4, 5, 1, 3, 4, 5, 1, 3, 4, 5, 1, 3]] * 2
  # sentences "4 5 .", "3 4 5 .", "3 4 5 ." (one repeat; the unfinished "3" is not counted)
  assert ditto.sentence_repetition_rate(outs, END) == pytest.approx(1 / 3)


def _held_out(n=8):
  spans = [ditto.split_sentences(d, END) for d in DOCS[:n]]
  return ([d[s[2, 0]:s[2, 1]] for d, s in zip(DOCS[:n], spans)],
          [d[s[1, 0]:s[1, 1]] for d, s in zip(DOCS[:n], spans)])


def test_self_reinforcement_curve_is_the_mean_probability_per_copy(tiny):
  config, params = tiny
  sentences, prefixes = _held_out()
  curve = ditto.self_reinforcement_curve(config, params, sentences, prefixes, 5, batch_size=8)
  tokens = np.zeros((8, T), np.int32)
  for i, (s, p) in enumerate(zip(sentences, prefixes)):
    row = p + s * 5
    tokens[i, :len(row)] = row
  prob = np.exp(np.asarray(losses.token_logprobs(
      losses.sequence_logits(params, config, jnp.asarray(tokens)), jnp.asarray(tokens))))
  expected = np.zeros((5,))
  for i, (s, p) in enumerate(zip(sentences, prefixes)):
    for n in range(5):
      start = len(p) + n * len(s)
      expected[n] += prob[i, start:start + len(s)].mean() / 8
  np.testing.assert_allclose(curve, expected, rtol=1e-5)
  lm = TransformerLM(config)  # an LM object works as well as its config
  np.testing.assert_allclose(
      ditto.self_reinforcement_curve(lm, params, sentences, prefixes, 5, batch_size=8), curve)


def _slope(curve):
  return float(np.polyfit(np.arange(1, len(curve) + 1), curve, 1)[0])


def test_training_breaks_self_reinforcement(tiny):
  """MLE on repetitive text makes repeats self-reinforcing; DITTO fine-tuning reverses it.

  One compiled step serves both phases (w_mle = 1: next-token loss, 0: DITTO loss) and
  shares the forward pass between them (`ditto_loss` is `sequence_logits` followed by
  `ditto_loss_from_logits`), to keep the test to a single training compilation.
  """
  config, params = tiny
  opt = optax.scale_by_adam()

  @jax.jit
  def step(params, state, batch, w_mle, lr):
    def total(p):
      logits = losses.sequence_logits(p, config, batch["tokens"])
      logp = losses.token_logprobs(logits, batch["tokens"])
      l_mle = -losses.masked_mean(logp, losses.default_mask(batch["tokens"]))
      l_pen, m = ditto.ditto_loss_from_logits(logits, batch, 0.5, "nl")
      return w_mle * l_mle + (1 - w_mle) * l_pen, m
    (_, m), g = jax.value_and_grad(total, has_aux=True)(params)
    updates, state = opt.update(g, state, params)
    return jax.tree.map(lambda p, u: p - lr * u, params, updates), state, m

  def run(params, steps, w_mle, lr, offset):
    state = opt.init(params)
    for i in range(steps):
      batch = _jnp(ditto.build_repetition_batch(DOCS, END, T, rng=offset + i, batch_size=16))
      params, state, m = step(params, state, batch, jnp.float32(w_mle), jnp.float32(lr))
    return params, m

  sentences, prefixes = _held_out()
  curve = lambda p: ditto.self_reinforcement_curve(config, p, sentences, prefixes, 5, 8)

  params_mle, _ = run(params, 200, 1.0, 1e-2, 0)
  c_mle = curve(params_mle)
  params_ditto, _ = run(params_mle, 30, 0.0, 3e-3, 1000)
  c_ditto = curve(params_ditto)
  assert c_mle.shape == c_ditto.shape == (5,)
  assert _slope(c_mle) > 0 and c_mle[-1] > c_mle[0], c_mle  # self-reinforcement
  assert _slope(c_ditto) < 0 and c_ditto[-1] < c_ditto[0], c_ditto  # decays with n
  assert _slope(c_ditto) < _slope(c_mle)
