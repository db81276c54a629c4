"""Best-of-N selection rules (card 17) and self-agreement (card 14)."""
from __future__ import annotations

import collections
import io

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from decoding import best_of_n, self_agreement
from decoding import answers as extractors
from decoding.cli import settings_from_config
from decoding.errors import GenerationError
from decoding.greedy import Greedy
from decoding.results import Generation
from decoding.self_agreement import SelfAgreement
from tests.fakes import BigramLM, ByteTokenizer
from tests.helpers import run_config, target


def _cands(scs, nlls=None):
  nlls = nlls if nlls is not None else [1.0] * len(scs)
  return [Generation(prompt_ids=[1], output_ids=[5, 6], token_logprobs=[-n / 2, -n / 2],
                     processed_logprobs=[0, 0], score=-n, finished=True, rank=i,
                     self_certainty=sc) for i, (sc, n) in enumerate(zip(scs, nlls))]


def test_borda_with_power_zero_is_majority_vote():
  rng = np.random.default_rng(0)
  for _ in range(50):
    n = int(rng.integers(1, 12))
    answers = [None if rng.random() < 0.2 else str(rng.integers(0, 3)) for _ in range(n)]
    scs = list(rng.normal(size=n))
    votes0 = best_of_n.borda_votes(answers, scs, power=0.0)
    counts = collections.Counter(a for a in answers if a is not None)
    assert votes0 == {a: float(c) for a, c in counts.items()}
    idx, info = best_of_n.select(_cands(scs), "majority", answers)
    if counts:
      assert counts[answers[idx]] == max(counts.values())
      # Among the tied majority answers, the winner is the one whose best response ranks highest.
      tied = {a for a, c in counts.items() if c == max(counts.values())}
      best = max((s, i) for i, s in enumerate(scs) if answers[i] in tied)[1]
      assert answers[idx] == answers[best] and idx == best


def test_borda_votes_by_hand():
  # Ranks by self-certainty: r1 = idx 2 ("7"), r2 = idx 0 ("5"), r3 = idx 3 ("5"), r4 = idx 1 (None).
  answers, scs = ["5", None, "7", "5"], [0.5, 0.1, 0.9, 0.3]
  votes = best_of_n.borda_votes(answers, scs, power=1.0)
  assert votes == {"7": 4.0, "5": 3.0 + 2.0}
  idx, info = best_of_n.select(_cands(scs), "borda", answers, borda_power=1.0)
  assert answers[idx] == "5" and idx == 0  # the most certain response with the winning answer
  idx, _ = best_of_n.select(_cands(scs), "borda", answers, borda_power=2.0)  # 16 vs 9 + 4
  assert answers[idx] == "7"


def test_certainty_and_likelihood_selection():
  c = _cands([0.2, 0.8, 0.5], nlls=[3.0, 5.0, 1.0])
  assert best_of_n.select(c, "self_certainty")[0] == 1
  assert best_of_n.select(c, "likelihood")[0] == 2
  # All answers unparseable: fall back to the most certain response.
  assert best_of_n.select(c, "borda", [None, None, None])[0] == 1


def test_answer_extractors():
  assert extractors.last_number("so 3 + 4 = 7. The answer is 1,200.0!") == "1200"
  assert extractors.last_number("no digits here") is None
  assert extractors.last_number("it is -3.50") == "-3.5"
  assert extractors.boxed(r"thus \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
  assert extractors.boxed("none") is None
  with pytest.raises(GenerationError, match="answer_extractor"):
    extractors.get_extractor("nope")


def _ascii_bigram(seed: int) -> tuple[BigramLM, jnp.ndarray]:
  """A bigram model over bytes that only emits printable ASCII (so paths are plain text)."""
  V = 128
  table = np.random.RandomState(seed).randn(V, V).astype(np.float32) * 2.0
  table[:, :32] = table[:, 127:] = -1e9
  return BigramLM(V), jnp.asarray(table)


def test_best_of_n_on_a_fake_model_selects_the_most_self_certain_sample():
  """The pipeline on a bigram model: N samples per prompt (plain sampling's, same seed), the
  most self-certain one returned."""
  lm, table = _ascii_bigram(0)
  prompts = [[72, 105], [65], [50, 43, 51]]
  sample = dict(max_new_tokens=6, seed=3, temperature=0.8)
  chosen = run_config(lm, table, prompts, dict(strategy="best_of_n", num_samples=4,
                                               selection="self_certainty", **sample))
  groups = best_of_n.group_by_prompt(
      run_config(lm, table, prompts, dict(strategy="sample", num_return_sequences=4, **sample)),
      len(prompts))
  assert len(chosen) == len(prompts)
  for g, cands in zip(chosen, groups):
    best = int(np.argmax([c.self_certainty for c in cands]))
    assert g.extras["selected"] == best and g.output_ids == cands[best].output_ids
    assert len({tuple(c.output_ids) for c in cands}) > 1  # samples differ


def test_self_agreement_on_a_fake_model_answers_a_prompt_holding_every_path():
  """Both stages on a bigram model over bytes: num_paths sampled paths per prompt (plain
  sampling's, same seed), then the greedy continuation of one text prompt holding the
  question and every path."""
  lm, table = _ascii_bigram(1)
  tok = ByteTokenizer()
  prompts = [tok.encode("What is 2 + 3?"), tok.encode("Name a color.")]
  sample = dict(max_new_tokens=6, seed=1, temperature=0.7)
  finals = run_config(lm, table, prompts, dict(strategy="self_agreement", num_paths=3,
                                               agreement_max_new_tokens=4, **sample),
                      tokenizer=tok)
  paths = run_config(lm, table, prompts, dict(strategy="sample", num_return_sequences=3, **sample),
                     tokenizer=tok)
  assert len(finals) == len(prompts)
  for i, (final, prompt) in enumerate(zip(finals, prompts)):
    assert final.prompt_ids == prompt
    texts = [tok.decode(g.output_ids) for g in paths[3 * i:3 * i + 3]]
    assert final.extras["paths"] == texts
    asked = tok.decode(final.extras["agreement_prompt_ids"])
    assert tok.decode(prompt) in asked and all(t.strip() in asked for t in texts)
    answer = run_config(lm, table, [final.extras["agreement_prompt_ids"]],
                        dict(strategy="greedy", max_new_tokens=4))
    assert final.output_ids == answer[0].output_ids


def _best_cfg(**kw):
  c = dict(strategy="best_of_n", max_new_tokens=10, seed=3, num_samples=4, temperature=0.8,
           selection="self_certainty", answer_extractor="last_number", batch_size=8)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def _samples(smollm, prompts, n):
  """n samples per prompt with _best_cfg's sampling settings, grouped by prompt."""
  c = dict(strategy="sample", max_new_tokens=10, seed=3, temperature=0.8, num_return_sequences=n)
  return best_of_n.group_by_prompt(run_config(smollm.lm, smollm.params, prompts, c, [2], 2),
                                   len(prompts))


@pytest.mark.slow
def test_best_of_n_on_smollm(smollm, prompt_ids):
  """The selected response is the most self-certain of N samples; the first N samples
  do not depend on N (so best-of-N curves can reuse one sample set)."""
  prompts = prompt_ids[:2]
  chosen = run_config(smollm.lm, smollm.params, prompts, _best_cfg(), [2], 2,
                      tokenizer=smollm.tokenizer)
  groups4 = _samples(smollm, prompts, 4)
  groups2 = _samples(smollm, prompts, 2)
  for g, c4, c2 in zip(chosen, groups4, groups2):
    assert [c.output_ids for c in c2] == [c.output_ids for c in c4[:2]]
    sc = [c.self_certainty for c in c4]
    assert g.extras["selected"] == int(np.argmax(sc))
    assert g.output_ids == c4[int(np.argmax(sc))].output_ids
    assert len({tuple(c.output_ids) for c in c4}) > 1  # samples differ
  # Sample 0 of N is what plain sampling gives.
  plain = _samples(smollm, prompts, 1)
  assert [p[0].output_ids for p in plain] == [c[0].output_ids for c in groups4]


def test_agreement_prompt_and_chat_split(smollm):
  tok = smollm.tokenizer
  q = "Tom has 3 apples and buys 5 more. How many?"
  ids = tok.encode_chat([{"role": "user", "content": q}])
  assert self_agreement.split_chat_prompt(tok, ids) == (q, True)
  assert self_agreement.split_chat_prompt(tok, tok.encode("plain text")) == ("plain text", False)
  p1 = self_agreement.agreement_prompt(q, ["It is 8.", "I think 7."])
  assert p1 == self_agreement.agreement_prompt(q, ["It is 8.", "I think 7."])
  assert "Solution 1: It is 8." in p1 and "Solution 2: I think 7." in p1 and q in p1
  assert "2 candidate solutions" in p1


def test_self_agreement_with_majority_stub_equals_self_consistency(smollm):
  """Card 14: if the model answers the agreement prompt with the majority answer,
  self-agreement equals self-consistency (majority vote), unparseable paths included."""
  tok = smollm.tokenizer
  rng = np.random.default_rng(0)

  def stub_generate(prompts, settings, **options):
    assert isinstance(settings, Greedy)  # the second stage
    outs = []
    for i, p in enumerate(prompts):
      text = tok.decode(p, skip_special_tokens=True)
      answers = [extractors.last_number(line) for line in text.split("\n")
                 if line.startswith("Solution ")]
      counts = collections.Counter(a for a in answers if a is not None)
      reply = f"The answer is {counts.most_common(1)[0][0]}." if counts else "I do not know."
      outs.append(Generation(prompt_ids=list(p), output_ids=tok.encode(reply),
                             token_logprobs=[], processed_logprobs=[], score=0.0,
                             finished=True, index=i))
    return outs

  prompts, paths, expected = [], [], []
  for k in range(6):
    prompts.append(tok.encode_chat([{"role": "user", "content": f"Question {k}?"}]))
    texts = [rng.choice(["So it is 4.", "Maybe 5.", "The result is 4", "no idea", "6 then 5"])
             for _ in range(5)]
    cands = [Generation(prompt_ids=[], output_ids=tok.encode(t), token_logprobs=[],
                        processed_logprobs=[], score=0.0, finished=True) for t in texts]
    paths.append(cands)
    answers = [extractors.last_number(t) for t in texts]
    counts = collections.Counter(a for a in answers if a is not None)
    expected.append(counts.most_common(1)[0][0] if counts else None)
  settings = SelfAgreement(num_paths=5, max_new_tokens=8, temperature=0.7)
  finals = self_agreement.self_agreement(settings, target(None, None, [2], 2, tok), prompts,
                                         stub_generate, paths=paths)
  assert [f.extras["answer"] for f in finals] == expected


@pytest.mark.slow
def test_self_agreement_end_to_end_cli(smollm, tmp_path, monkeypatch):
  """The CLI runs the two stages; the final prompt holds every sampled path."""
  from configs import self_agreement as sa_config
  from decoding import generate as cli
  monkeypatch.setattr(cli, "load", lambda cfg: (smollm, None))  # the session's loaded model
  cfg = sa_config.get_config()
  cfg.num_paths, cfg.max_new_tokens, cfg.agreement_max_new_tokens = 2, 6, 6
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  inp.write_text('{"prompt": "What is 2 + 3?"}\n')
  res = cli.run(cfg, None, str(inp), str(out), out=io.StringIO())
  assert len(res) == 1 and len(res[0]["paths"]) == 2
  final_prompt = smollm.tokenizer.decode(res[0]["agreement_prompt_ids"])
  for path in res[0]["paths"]:
    assert path.strip() in final_prompt


@pytest.mark.parametrize("bad, match", [
    (dict(num_samples=0), "num_samples"), (dict(selection="best"), "selection"),
    (dict(borda_power=-1.0), "borda_power"), (dict(answer_extractor="x"), "answer_extractor"),
    (dict(num_return_sequences=2), "num_return_sequences"), (dict(temperature=0.0), "temperature"),
])
def test_best_of_n_bad_config(bad, match):
  with pytest.raises(GenerationError, match=match):
    settings_from_config(_best_cfg(**bad))


@pytest.mark.parametrize("bad, match", [
    (dict(num_paths=0), "num_paths"), (dict(agreement_template="no fields"), "agreement_template"),
    (dict(agreement_template="{question} {paths} {oops}"), "format"),
    (dict(agreement_max_new_tokens=0), "agreement_max_new_tokens"),
])
def test_self_agreement_bad_config(bad, match):
  c = dict(strategy="self_agreement", max_new_tokens=8, num_paths=2, temperature=0.7)
  c.update(bad)
  with pytest.raises(GenerationError, match=match):
    settings_from_config(ml_collections.ConfigDict(c))


def test_self_agreement_needs_tokenizer(smollm):
  cfg = ml_collections.ConfigDict(dict(strategy="self_agreement", max_new_tokens=4, num_paths=2,
                                       temperature=0.7))
  with pytest.raises(GenerationError, match="tokenizer"):
    run_config(smollm.lm, smollm.params, [[1, 2]], cfg, [2], 2)
