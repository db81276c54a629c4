"""Greedy decoding on SmolLM2 reproduces Hugging Face `generate` token for token."""
from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from tests.helpers import run_config

torch = pytest.importorskip("torch")

N_NEW = 32


def _cfg(**kw):
  c = dict(strategy="greedy", max_new_tokens=N_NEW, min_new_tokens=N_NEW, seed=0, batch_size=8)
  c.update(kw)
  return ml_collections.ConfigDict(c)


@pytest.fixture(scope="module")
def ours_batched(smollm, prompt_ids):
  return run_config(smollm.lm, smollm.params, prompt_ids, _cfg(), [2], 2)


@pytest.mark.slow
def test_greedy_equals_hf_generate(smollm, hf_smollm, prompt_ids, ours_batched):
  """8 prompts x 32 new tokens decoded as one mixed-length batch; the shortest, the longest
  and two between are identical to HF greedy per prompt (HF's CPU generate is the slow part)."""
  assert len(prompt_ids) == 8
  order = sorted(range(8), key=lambda i: len(prompt_ids[i]))
  for i in (order[0], order[2], order[5], order[7]):
    ids, ours = prompt_ids[i], ours_batched[i]
    with torch.no_grad():
      ref = hf_smollm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                              dtype=torch.long),
                               max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                               eos_token_id=2, pad_token_id=2)
    ref_new = ref[0, len(ids):].tolist()
    assert ours.output_ids == ref_new, smollm.tokenizer.decode(ids)


def test_greedy_logprobs_equal_hf_scores(smollm, hf_smollm, prompt_ids, ours_batched):
  ids = prompt_ids[0]
  with torch.no_grad():
    ref = hf_smollm.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                             eos_token_id=2, pad_token_id=2, output_logits=True,
                             return_dict_in_generate=True)
  ref_lp = [float(torch.log_softmax(l[0], -1)[t]) for l, t in
            zip(ref.logits, ref.sequences[0, len(ids):])]
  np.testing.assert_allclose(ours_batched[0].token_logprobs[:8], ref_lp, atol=2e-4)


@pytest.mark.slow
def test_batch_equals_each_prompt_alone(smollm, prompt_ids, ours_batched):
  """Mixed-length batch gives each prompt's single-row tokens."""
  cfg = _cfg(max_new_tokens=16, min_new_tokens=16)
  for i in (0, 4, 7):
    alone = run_config(smollm.lm, smollm.params, [prompt_ids[i]], cfg, [2], 2)
    assert alone[0].output_ids == ours_batched[i].output_ids[:16]


@pytest.mark.slow
def test_sampling_is_batch_invariant_on_real_model(smollm, prompt_ids):
  cfg = _cfg(strategy="sample", max_new_tokens=12, min_new_tokens=0, temperature=0.8, top_p=0.95,
             top_k=50)
  together = run_config(smollm.lm, smollm.params, prompt_ids[:3], cfg, [2], 2)
  alone = run_config(smollm.lm, smollm.params, [prompt_ids[2]], cfg, [2], 2, row_ids=[2])
  assert alone[0].output_ids == together[2].output_ids


@pytest.mark.slow
def test_scanned_layout_greedy_equals_the_default_layout(smollm, prompt_ids, ours_batched):
  from models import transformer
  from models.lm import TransformerLM
  cfg = smollm.config.replace(scan_layers=True, fused_projections=False)
  params = transformer.stack_layers(
      transformer.unfuse_projections(smollm.params, smollm.config), cfg.num_layers)
  out = run_config(TransformerLM(cfg), params, prompt_ids[:2],
                   _cfg(max_new_tokens=16, min_new_tokens=16), [2], 2)
  for o, ref in zip(out, ours_batched[:2]):
    assert o.output_ids == ref.output_ids[:16]
