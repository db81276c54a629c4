r"""AdaDec ("Towards Better Code Generation: Adaptive Decoding with Uncertainty Guidance", He et
al., 2025) for `python -m decoding.generate --config=configs/adadec.py`.

The defaults live in `AdaDec` (decoding/adadec.py), from the reference code
(github.com/SYSUSELab/AdaDec): at steps whose next-token entropy is at least
`entropy_threshold` nats, the top 3 candidates are each rolled out greedily for up to 5 tokens
and the best average log-prob wins; elsewhere the token is greedy. The threshold is learned per
model (`python -m train.adadec_threshold`); the default 1.0 is a placeholder of the right size.
For example, a function body (bash's $'...' turns \n into newlines):

  python -m decoding.generate --config=configs/adadec.py --config.chat_template=False \
      --config.entropy_threshold=0.9 --config.max_new_tokens=96 \
      --prompt=$'def is_prime(n: int) -> bool:\n    # True if n is a prime number\n'
"""
from configs import generate as base


def get_config():
  c = base.get_config()
  c.strategy = "adadec"
  return c
