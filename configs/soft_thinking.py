"""Stochastic soft thinking ("LLMs are Single-threaded Reasoners: Demystifying the Working
Mechanism of Soft Thinking", Wu et al., ICLR 2026) for
`python -m decoding.generate --config=configs/soft_thinking.py`.

The defaults live in `SoftThinking` (decoding/soft_thinking.py), from the reference code's
run scripts (github.com/WJMacro/Randomized-Soft-Thinking): Gumbel-softmax soft tokens at
tau = 0.5 over the top 10 components of the top-30 / top-p 0.95 distribution at T = 0.6,
thinking up to 192 soft steps or until `</think>`, then a sampled answer (T = 0.6, top-k 30,
top-p 0.95). SmolLM2 has no thinking tokens: give it markers it writes, e.g.

  python -m decoding.generate --config=configs/soft_thinking.py \
      --config.think_end=" answer is" --config.max_think_tokens=96 \
      --config.max_new_tokens=128 --prompt="Tom has 3 apples and buys 5 more. How many \
      apples does he have? Think step by step, then finish with 'The answer is' and the number."
"""
from configs import generate as base


def get_config():
  c = base.get_config()
  c.strategy = "soft_thinking"
  return c
