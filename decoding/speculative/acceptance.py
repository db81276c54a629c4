"""Acceptance rules of speculative verification: the lossless rule and the LOSSY relaxations.

A rule is a small frozen pytree: its settings are static (part of the jit cache key, so two
equal rules share one compile) and its tables, if any, are traced leaves. The shared
verifier (`decoding.speculative.verify.verify_chain`) applies it.

* `Strict()`: the lossless rule (greedy: keep drafts equal to the target's argmax;
  sampling: rejection sampling). Speculative output is then exactly the target's.
* `GadPlus(beta, tau)`: GAD++ ("Lossless Acceleration for Seq2seq Generation with
  Aggressive Decoding", Ge et al., 2022), greedy only: a draft is kept while it ranks among
  the target's top-beta tokens and is within tau of the top-1 log-probability.
* `Lenient(epsilon)`: DistillSpec's lenient acceptance ("DistillSpec: Improving Speculative
  Decoding via Knowledge Distillation", Zhou et al., ICLR 2024), sampling only: accept with
  min(1, p / (epsilon q)).
* `Lantern(delta, neighbors)`: LANTERN's latent-neighbour relaxation ("LANTERN: Accelerating
  Visual Autoregressive Models with Relaxed Speculative Decoding", Jang et al., ICLR 2025),
  greedy or sampling: a draft borrows up to delta of probability from its nearest codes
  (`neighbors` [V, k], `decoding.speculative.lantern.neighbor_table`).

Every relaxation applies to chains; LANTERN also to token trees (`verify.verify_tree`), as
the paper runs it on EAGLE-2 trees. GAD++ and lenient acceptance need a chain.
"""
from __future__ import annotations

from typing import ClassVar

import flax.struct
import jax

from decoding.errors import GenerationError

Array = jax.Array


class Acceptance:
  """Base of the rules. `modes`: the verification modes ("greedy", "sample") it applies to."""
  lossless: ClassVar[bool] = False
  modes: ClassVar[tuple[str, ...]] = ("greedy", "sample")
  trees: ClassVar[bool] = False  # whether token trees can be verified under the rule

  def check(self, sample: bool, kind: str) -> None:
    """GenerationError unless the rule applies to this mode and drafter kind."""
    mode = "sample" if sample else "greedy"
    if mode not in self.modes:
      need = "do_sample=True" if "sample" in self.modes else "do_sample=False"
      raise GenerationError(f"{type(self).__name__} acceptance relaxes {self.modes[0]} "
                            f"verification: set {need}")
    if kind != "chain" and not self.trees:
      raise GenerationError(f"{type(self).__name__} acceptance applies to chain drafters, "
                            "not token trees")


@flax.struct.dataclass
class Strict(Acceptance):
  lossless: ClassVar[bool] = True
  trees: ClassVar[bool] = True


@flax.struct.dataclass
class GadPlus(Acceptance):
  beta: int = flax.struct.field(pytree_node=False, default=5)
  tau: float = flax.struct.field(pytree_node=False, default=3.0)
  modes: ClassVar[tuple[str, ...]] = ("greedy",)


@flax.struct.dataclass
class Lenient(Acceptance):
  epsilon: float = flax.struct.field(pytree_node=False, default=1.0)
  modes: ClassVar[tuple[str, ...]] = ("sample",)


@flax.struct.dataclass
class Lantern(Acceptance):
  neighbors: Array  # [V, k] int32, -1 pads
  delta: float = flax.struct.field(pytree_node=False, default=0.1)
  trees: ClassVar[bool] = True
