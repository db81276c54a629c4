"""Architecture configuration for the Llama-family decoder (Llama, SmolLM2, Qwen2)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from models.moe import TOP_K_WEIGHTS, Routing

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
MATMUL_KERNELS = ("xla", "packed")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

_PRECISIONS = {
    "default": jax.lax.Precision.DEFAULT,
    "high": jax.lax.Precision.HIGH,
    "highest": jax.lax.Precision.HIGHEST,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static hyperparameters of a Llama-family decoder.

  `param_dtype` is the storage dtype of the weights; `dtype` is the compute dtype;
  `proj_dtype`, when set, the storage dtype of the projection weights only (attention and
  MLP; `models.numerics`). Storing the projections in bf16 and computing in fp32 is LayerCast
  ("Give Me FP32 or Give Me Death? Challenges and Solutions for Reproducible Reasoning"):
  every matmul upcasts its weight just in time. `matmul_precision="highest"` forces full
  fp32 products on accelerators whose default fp32 matmul is TF32/bf16-pass.
  `models.numerics.recipe` names the usual combinations (fp32, bf16, layercast).
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = True
  qkv_bias: bool = False
  architecture: str = "llama"
  max_position_embeddings: int = 8192
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  proj_dtype: Any = None  # storage dtype of the projection weights (None: param_dtype)
  matmul_precision: str = "default"
  split_k: int = 1  # blocked accumulation of matmuls (see transformer.matmul)
  scan_layers: bool = True  # stacked layers under nn.scan (False: per-layer params, unrolled)
  remat: bool = False  # rematerialize each layer's activations in the backward pass (training)
  # q/k/v and gate/up as one matmul each (`transformer.fuse_projections`): fewer, larger
  # matmuls for inference; training, LoRA and checkpoints use the separate projections
  fused_projections: bool = False
  # "xla": weights [K, N] and XLA's dot. "packed": weights packed into column panels at load
  # time and multiplied by the CPU kernel of `models.packed_matmul` (inference only; several
  # times faster than XLA:CPU for 2-16-row products, e.g. speculative verification)
  matmul_kernel: str = "xla"
  # a row's outputs independent of the batch, its padding and the cache length
  # (`models.batch_invariant`): one new token per layer pass, tree sums, fixed-shape products
  batch_invariant: bool = False
  # Mixture of Experts (`models.moe`): 0 = the dense MLP; else every layer's MLP is
  # `moe_experts` SwiGLU experts of `moe_intermediate_size` hidden units (0: intermediate_size)
  # behind a router, combined by `moe_routing` (top-k, rank-k, one expert, all)
  moe_experts: int = 0
  moe_intermediate_size: int = 0
  moe_routing: Routing = Routing()
  # hidden units of a shared expert that every token uses with weight 1 beside the routed
  # ones ("DeepSeekMoE", Dai et al., 2024); 0: none
  moe_shared_intermediate_size: int = 0
  # top-k weights: "sum_one" (renormalised to sum to 1, Mixtral) or "mean_one" (times k, so
  # they average 1: for experts that are parts of one dense MLP rather than copies of it)
  moe_top_k_weights: str = "sum_one"

  def __post_init__(self):
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise ValueError(
          f"unsupported architecture {self.architecture!r}; supported: {SUPPORTED_ARCHITECTURES}")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "intermediate_size"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if self.matmul_precision not in _PRECISIONS:
      raise ValueError(
          f"matmul_precision must be one of {sorted(_PRECISIONS)}, got {self.matmul_precision!r}")
    if self.matmul_kernel not in MATMUL_KERNELS:
      raise ValueError(
          f"matmul_kernel must be one of {MATMUL_KERNELS}, got {self.matmul_kernel!r}")
    if self.batch_invariant and self.split_k > 1:
      raise ValueError("batch_invariant=True fixes the order of every sum; split_k > 1 "
                       "(blocked accumulation) does not apply: use split_k=1")
    if self.moe_experts < 0 or self.moe_intermediate_size < 0:
      raise ValueError(f"moe_experts and moe_intermediate_size must be >= 0, got "
                       f"{self.moe_experts} and {self.moe_intermediate_size}")
    if self.moe_experts:
      if not isinstance(self.moe_routing, Routing):
        raise ValueError(f"moe_routing must be a models.moe.Routing, got {self.moe_routing!r}")
      self.moe_routing.check(self.moe_experts)
      if self.moe_top_k_weights not in TOP_K_WEIGHTS:
        raise ValueError(f"moe_top_k_weights must be one of {TOP_K_WEIGHTS}, got "
                         f"{self.moe_top_k_weights!r}")
      if self.moe_shared_intermediate_size < 0:
        raise ValueError("moe_shared_intermediate_size must be >= 0, got "
                         f"{self.moe_shared_intermediate_size}")
      if self.batch_invariant or self.matmul_kernel == "packed":
        raise ValueError("a Mixture-of-Experts model runs with matmul_kernel='xla' and "
                         "batch_invariant=False")
    if self.matmul_kernel == "packed":
      if jnp.dtype(self.dtype) != jnp.float32:
        raise ValueError("matmul_kernel='packed' computes in float32; got compute dtype "
                         f"{jnp.dtype(self.dtype).name} (use matmul_kernel='xla' for bf16 compute)")
      for name in ("param_dtype", "projection_dtype"):
        if jnp.dtype(getattr(self, name)) not in (jnp.float32, jnp.bfloat16):
          raise ValueError("matmul_kernel='packed' stores float32 or bfloat16 weights, got "
                           f"{name}={jnp.dtype(getattr(self, name)).name}")
      if self.split_k > 1:
        raise ValueError("matmul_kernel='packed' sums each product in k order; split_k > 1 "
                         "(blocked accumulation) needs matmul_kernel='xla'")

  @property
  def projection_dtype(self):
    """Storage dtype of the attention and MLP projection weights."""
    return self.param_dtype if self.proj_dtype is None else self.proj_dtype

  @property
  def expert_intermediate_size(self) -> int:
    """Hidden units of one expert (Mixture of Experts)."""
    return self.moe_intermediate_size or self.intermediate_size

  @property
  def precision(self) -> jax.lax.Precision:
    return _PRECISIONS[self.matmul_precision]

  @property
  def num_groups(self) -> int:
    return self.num_heads // self.num_kv_heads

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


def tiny_config(**overrides) -> ModelConfig:
  """A few-hundred-parameter config for fast, model-free tests."""
  base = dict(vocab_size=32, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=4, intermediate_size=24, rope_theta=10000.0, rms_norm_eps=1e-6,
              tie_word_embeddings=True, max_position_embeddings=128)
  base.update(overrides)
  return ModelConfig(**base)
