"""`benchmarks.step_profile` sorts XLA operations into the parts of a decoding step."""
import pytest

from benchmarks.step_profile import part_of

LOOP = "jit(decode)/while/body/jit(forward)/Transformer"


@pytest.mark.parametrize("opcode,op_name,part", [
    ("fusion", f"{LOOP}/layers_3/attn/qkv_proj/dot_general", "weight matmuls"),
    ("custom-call", f"{LOOP}/layers_3/mlp/down_proj/ffi_call", "weight matmuls"),  # packed
    ("custom-call", f"{LOOP}/embed.attend/ffi_call", "LM head"),
    ("scatter", f"{LOOP}/layers_0/attn/scatter", "KV-cache writes"),
    ("fusion", "jit(decode)/jit(forward)/Transformer/layers_0/mlp/gate_up_proj/dot_general",
     "prefill"),
    # the prompt's pass copying packed weights for XLA's product keeps no module path
    ("fusion", "jit(speculative_decode)/jit(forward)", "prefill"),
    ("fusion", "jit(decode)/while/body/jit(log_softmax)/reduce_sum", "outside model"),
])
def test_operations_are_sorted_into_the_parts_of_a_step(opcode, op_name, part):
  assert part_of(opcode, op_name) == part
