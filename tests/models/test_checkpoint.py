"""Checkpoint loading: GGUF (Q/K un-permutation), safetensors, checksums, clear errors, LayerCast."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import artifacts, checkpoint, registry
from models.lm import TransformerLM, load_model, save_lm
from models.tokenizer import Tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")


def _tiny_hf(arch: str, tie: bool):
  torch.manual_seed(0)
  common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=tie, max_position_embeddings=128)
  if arch == "llama":
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
  else:
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
  with torch.no_grad():  # non-trivial norms and biases
    for n, p in model.named_parameters():
      if "norm" in n or n.endswith("bias"):
        p.add_(torch.randn_like(p) * 0.1)
  return model.eval()


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """What llama.cpp's converter does to Q/K rows of llama models (the inverse of our fix)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _write_gguf(model, arch: str, path: str) -> None:
  cfg = model.config
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
  names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
           "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
  w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
  for i in range(cfg.num_hidden_layers):
    for hf_name, g_name in names.items():
      for kind in ("weight", "bias"):
        key = f"model.layers.{i}.{hf_name}.{kind}"
        if key not in sd:
          continue
        t = sd[key]
        if arch == "llama" and g_name in ("attn_q", "attn_k") and kind == "weight":
          heads = cfg.num_attention_heads if g_name == "attn_q" else cfg.num_key_value_heads
          t = _llama_cpp_permute(t, heads)
        w.add_tensor(f"blk.{i}.{g_name}.{kind}", t)
  w.add_tensor("output_norm.weight", sd["model.norm.weight"])
  if not cfg.tie_word_embeddings:
    w.add_tensor("output.weight", sd["lm_head.weight"])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def _our_logits(config, params, ids):
  lm = TransformerLM(config)
  out = lm(params, jnp.asarray([ids]), jnp.arange(len(ids))[None], lm.init_cache(1, 32))
  return np.asarray(out.logits[0])


IDS = [3, 17, 42, 5, 9, 63, 0, 21]


@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("qwen2", False)])
def test_gguf_loader_matches_hf(tmp_path, arch, tie):
  model = _tiny_hf(arch, tie)
  path = str(tmp_path / "m.gguf")
  _write_gguf(model, arch, path)
  config, params, _ = checkpoint.load_gguf(path)
  assert config.architecture == arch and config.tie_word_embeddings == tie
  assert config.qkv_bias == (arch == "qwen2")
  with torch.no_grad():
    ref = model(torch.tensor([IDS])).logits[0].numpy()
  np.testing.assert_allclose(_our_logits(config, params, IDS), ref, atol=1e-5)


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen2", False)])
def test_safetensors_loader_matches_hf(tmp_path, arch, tie):
  model = _tiny_hf(arch, tie)
  model.save_pretrained(tmp_path, safe_serialization=True)
  config, params = checkpoint.load_safetensors(str(tmp_path))
  with torch.no_grad():
    ref = model(torch.tensor([IDS])).logits[0].numpy()
  np.testing.assert_allclose(_our_logits(config, params, IDS), ref, atol=1e-5)


def test_wrong_checksum_is_rejected(tmp_path):
  model = _tiny_hf("llama", True)
  path = str(tmp_path / "m.gguf")
  _write_gguf(model, "llama", path)
  with pytest.raises(checkpoint.ChecksumError, match="checksum mismatch"):
    checkpoint.load_gguf(path, sha256="0" * 64)
  good = checkpoint.sha256_file(path)
  checkpoint.load_gguf(path, sha256=good)  # the right one passes


def test_missing_file_and_unknown_model():
  with pytest.raises(FileNotFoundError, match="not found"):
    checkpoint.load_gguf("/nonexistent/model.gguf")
  with pytest.raises(ValueError, match="unknown model"):
    registry.resolve("gpt-17-turbo")


def test_unsupported_architecture(tmp_path):
  path = str(tmp_path / "g.gguf")
  w = gguf.GGUFWriter(path, "gpt2")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
    checkpoint.load_gguf(path)
  with pytest.raises(ValueError, match="unsupported model_type"):
    checkpoint.hf_config({"model_type": "gpt_neox"})


def test_default_model_checksum_is_verified(smollm):
  path, sha, _ = registry.resolve("smollm2-135m-instruct")
  assert checkpoint.sha256_file(path) == sha
  assert smollm.sha256 == sha  # a registered model is named by its pinned checksum


def test_loaded_model_sha256_of_unregistered_files(tmp_path, monkeypatch):
  """An unregistered .gguf file or safetensors folder is named by the checksum of its
  file(s), computed at load; an exported folder by its manifest's verified checksum."""
  model = _tiny_hf("llama", True)
  path = str(tmp_path / "m.gguf")
  _write_gguf(model, "llama", path)
  with monkeypatch.context() as patch:  # the tiny GGUF file carries no tokenizer
    patch.setattr(Tokenizer, "from_gguf", staticmethod(lambda path: None))
    assert load_model(path).sha256 == checkpoint.sha256_file(path)
  folder = tmp_path / "hf"
  model.save_pretrained(folder, safe_serialization=True)
  shards = checkpoint.safetensors_shards(str(folder))
  m = load_model(str(folder))
  assert m.sha256 == checkpoint.sha256_files(shards) == checkpoint.sha256_file(shards[0])
  export = save_lm(str(tmp_path / "export"), m.config, m.params, info={"note": "test"})
  again = load_model(export)
  _, manifest = artifacts.read_manifest(export, "lm")
  assert again.sha256 == manifest["params"]["sha256"] == checkpoint.sha256_file(
      str(tmp_path / "export" / "params.safetensors"))
  jax.tree.map(np.testing.assert_array_equal, again.params, m.params)


def test_layercast_equals_fp32_on_bf16_rounded_weights(smollm, prompt_ids):
  """bf16 storage + fp32 compute is the fp32 model on bf16-rounded weights (LayerCast)."""
  cfg32 = smollm.config
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), smollm.params)
  p_rounded = jax.tree.map(lambda x: x.astype(jnp.float32), p16)
  cast = TransformerLM(cfg32.replace(param_dtype=jnp.bfloat16))
  ids = prompt_ids[0]
  a = cast(p16, jnp.asarray([ids]), jnp.arange(len(ids))[None], cast.init_cache(1, 32)).logits
  b = smollm.lm(p_rounded, jnp.asarray([ids]), jnp.arange(len(ids))[None],
                smollm.lm.init_cache(1, 32)).logits
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-5)
  nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))
  assert nbytes(p16) * 2 == nbytes(smollm.params)


def test_load_model_from_safetensors_folder_with_tokenizer(tmp_path, smollm):
  """A user's own HF folder: weights + tokenizer.json + tokenizer_config.json."""
  model = _tiny_hf("llama", True)
  model.save_pretrained(tmp_path, safe_serialization=True)
  smollm.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
  import json
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "add_bos_token": False,
       "chat_template": smollm.tokenizer.chat_template}))
  m = load_model(str(tmp_path))
  assert m.tokenizer.eos_id == 2 and m.tokenizer.bos_id == 1
  text = "Hello world, 123 tokens!"
  assert m.tokenizer.encode(text) == smollm.tokenizer.encode(text)
  msgs = [{"role": "user", "content": "hi"}]
  assert m.tokenizer.encode_chat(msgs) == smollm.tokenizer.encode_chat(msgs)
  assert m.config.num_layers == 2
