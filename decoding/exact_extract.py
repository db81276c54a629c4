"""Exact-extract: the most likely answer that is a span of the passage, found exactly.

"How Optimal is Greedy Decoding for Extractive Question Answering?" (Castel, Ram, Efrat,
Levy; AKBC 2022). Greedy decoding of an extractive-QA prompt often returns text that is not
in the passage; exact-extract instead searches every token span c_i..c_j of the passage and
returns the one the model gives the lowest negative log-likelihood as a complete answer:

  NLL(i, j) = sum_{k=i..j} l(i, k) + e(i, j)
  l(i, k) = -log p(c_k | x, c_i..c_{k-1})      (token NLL)
  e(i, j) = -log p(EOS | x, c_i..c_j)          (NLL of stopping after c_j)

For a decoder-only model (ours) the prompt x is a prefix: it is prefilled once and its KV
cache copied to a batch of start positions i; one teacher-forced pass over [c_i .. c_{i+L-1}]
per start gives every l(i, .) and e(i, .) at once (a causal model scores all spans that
start at i in the same pass), so the search costs n * L decoder positions instead of the
n * L^2 of scoring each span alone. The first token's NLL l(i, i) is read from the prompt's
last logits, shared by all starts. A prefix sum gives NLL(i, j); spans past the passage end
(or longer than `max_span_tokens`) are +inf. With `length_normalize` spans are ranked by
NLL / (length + 1), the number of scored tokens (the span and the stop token); the reference
code's +2 also counts T5's answer sentinel, which a decoder-only prompt does not have.

Prompt (`prompt_text`): `Text: <passage> Question: <question> Answer:` with no trailing space,
so the first span token's leading-space BPE form is the natural continuation. The passage is
tokenized on its own, as " " + passage (every word then has its leading-space form, the
form it has in running text), and the prompt's token ids are the concatenation
[before | passage | after] (`Query`), so the spans are exactly tokens of the prompt. In-context
examples come before, each `Text: .. Question: .. Answer: <answer>` followed by the stop
token and a blank line, so the model sees answers end with the token exact-extract scores
as the stop. The stop token is the model's first EOS id (`<|im_end|>`, id 2, for SmolLM2).

Windows: a passage that does not fit the model's context (or longer than `window_tokens`)
is cut into token windows of W tokens starting every `window_stride` tokens (default W / 2,
so consecutive windows overlap by half and every span of length <= W / 2 lies wholly inside
one); each window is its own query, with the passage replaced by the window in the prompt,
and the best span over all windows wins by NLL (a span seen in several windows keeps its
lowest score). The reference code uses 512-word windows with stride 120.

Pruning (`prune_starts`, on by default; our addition, exact): every term of NLL(i, j) is a
non-negative NLL, so NLL(i, j) >= l(i, i), which the prefill already gives for every start.
A start whose bound exceeds its query's `top_spans`-th best score found so far is skipped:
none of its spans can enter the result, which is therefore identical to scoring every start.
(With `length_normalize` the bound is l(i, i) / (longest span from i + 1).) The first pass
scores each query's best-bound starts (round-robin over the queries of a batch) to set the
cuts early; the rest go longest pass first and best bound first within a pass length, so
that a pass is not as long as the longest suffix mixed into it. On the extractive-QA prompts
most passage tokens are unlikely first answer tokens, so most starts are skipped.

Shapes are bucketed (prompts and each pass's length to powers of two, `start_chunk` starts
per pass), so new passages reuse the compiled passes; the host loops over chunks of starts
only, each pass as long as its chunk's longest suffix needs. Spans are ranked on the host
from the [starts, L] NLL matrices (tiny next to the passes).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from decoding.errors import GenerationError
from decoding.lengths import bucket, plan_lengths
from decoding.prefill import new_cache, prefill, shared_prefix_len
from decoding.results import Generation
from decoding.settings import Settings, check_bool, check_int, is_int, settings
from decoding.strategy import Strategy, Target

Array = jax.Array

REQUEST_FIELDS = ("passage", "question", "examples")
PRUNE_MARGIN = 1e-3  # nats: a start is skipped only when its bound beats the cut by more
EXAMPLE_FIELDS = ("passage", "question", "answer")


# ----------------------------------------------------------------------------- settings


@settings
class ExactExtract(Settings):
  """Exact-extract search. Defaults follow the reference: no length limit (its 512-token
  limit is effectively none), raw NLL (not length-normalized)."""
  max_span_tokens: int = 0  # L_max; 0: any length up to the whole passage (window)
  length_normalize: bool = False  # rank by NLL / (length + 1) instead of NLL
  top_spans: int = 5  # spans reported per example (best first)
  start_chunk: int = 16  # start positions per compiled pass (memory: chunk x L x V logits)
  window_tokens: int = 0  # passage tokens per window; 0: as many as the context allows
  window_stride: int = 0  # tokens between window starts; 0: window_tokens // 2
  prune_starts: bool = True  # skip starts that cannot reach the top_spans (exact); off: all

  def validate(self) -> None:
    super().validate()
    check_int("max_span_tokens", self.max_span_tokens, 0)
    check_bool("length_normalize", self.length_normalize)
    check_int("top_spans", self.top_spans, 1)
    check_int("start_chunk", self.start_chunk, 1)
    check_int("window_tokens", self.window_tokens, 0)
    check_int("window_stride", self.window_stride, 0)
    check_bool("prune_starts", self.prune_starts)
    if self.window_tokens and self.window_stride > self.window_tokens:
      raise GenerationError(f"window_stride={self.window_stride} exceeds window_tokens="
                            f"{self.window_tokens}: windows would skip passage tokens")


# ------------------------------------------------------------------------------ prompts


def prompt_text(passage: str, question: str, answer: Optional[str] = None) -> str:
  """The paper's pattern for a decoder-only model: `Text: <passage> Question: <question>
  Answer:` (no trailing space), followed by ` <answer>` for an in-context example."""
  text = f"Text: {passage.strip()} Question: {question.strip()} Answer:"
  return text if answer is None else f"{text} {answer.strip()}"


@dataclasses.dataclass(frozen=True)
class Query:
  """One search, as token ids: the prompt is before + passage + after; spans are token
  spans of `passage`. `offset` is where `passage` starts in the example's full passage
  tokenization (windows), `example` the example it belongs to."""
  before: tuple[int, ...]
  passage: tuple[int, ...]
  after: tuple[int, ...]
  offset: int = 0
  example: int = 0

  @property
  def prompt_ids(self) -> list[int]:
    return list(self.before) + list(self.passage) + list(self.after)

  def window(self, start: int, size: int) -> "Query":
    return dataclasses.replace(self, passage=self.passage[start:start + size],
                               offset=self.offset + start)


def build_query(tokenizer, passage: str, question: str, examples: Sequence[dict] = (),
                stop_id: Optional[int] = None) -> Query:
  """The token-id query of a request (see the module docstring): in-context examples (each
  ended by `stop_id` when given) and "Text:" before, the passage tokenized on its own as
  " " + passage, then " Question: <question> Answer:"."""
  before: list[int] = []
  for ex in examples:
    before += tokenizer.encode(prompt_text(ex["passage"], ex["question"], ex["answer"]),
                               add_special_tokens=not before)
    before += ([stop_id] if stop_id is not None else []) + tokenizer.encode(
        "\n\n", add_special_tokens=False)
  before += tokenizer.encode("Text:", add_special_tokens=not before)
  return Query(tuple(before),
               tuple(tokenizer.encode(" " + passage.strip(), add_special_tokens=False)),
               tuple(tokenizer.encode(f" Question: {question.strip()} Answer:",
                                      add_special_tokens=False)))


def check_request(obj: Any, where: str) -> None:
  """GenerationError unless `obj` is {"passage": non-empty str, "question": str, optional
  "examples": [{"passage", "question", "answer"} strs]} and nothing else."""
  if not isinstance(obj, dict):
    raise GenerationError(f'{where}: expected an object with "passage" and "question"')
  extra = sorted(set(obj) - set(REQUEST_FIELDS))
  if extra:
    raise GenerationError(f"{where}: unknown field(s) {extra}; exact_extract reads "
                          f"{', '.join(REQUEST_FIELDS)}")
  for key in ("passage", "question"):
    if key not in obj:
      raise GenerationError(f'{where}: missing "{key}"')
    if not isinstance(obj[key], str):
      raise GenerationError(f'{where}: "{key}" must be a string, got {type(obj[key]).__name__}')
  if not obj["passage"].strip():
    raise GenerationError(f'{where}: "passage" is empty')
  examples = obj.get("examples", [])
  if not isinstance(examples, list):
    raise GenerationError(f'{where}: "examples" must be a list of objects')
  for k, ex in enumerate(examples):
    if not (isinstance(ex, dict) and set(ex) == set(EXAMPLE_FIELDS)
            and all(isinstance(ex[f], str) for f in EXAMPLE_FIELDS)):
      raise GenerationError(f'{where}: examples[{k}] must be an object with exactly the string '
                            f'fields {", ".join(EXAMPLE_FIELDS)}')


def check_inputs(inputs: Sequence[Any]) -> list:
  """`generate`'s check of exact-extract inputs: request dicts (`check_request`) or
  `Query`s with a non-empty passage and a non-empty prompt."""
  if len(inputs) == 0:
    raise GenerationError("no inputs given")
  for i, x in enumerate(inputs):
    if isinstance(x, Query):
      if not x.passage:
        raise GenerationError(f"input {i}: the passage has no tokens")
      if not x.before and not x.after:
        raise GenerationError(f"input {i}: the prompt has no tokens besides the passage")
      if not all(is_int(t) for t in x.prompt_ids):
        raise GenerationError(f"input {i}: non-integer token ids")
    else:
      check_request(x, f"input {i}")
  return list(inputs)


# ------------------------------------------------------------------------- the passes


@functools.partial(jax.jit, static_argnames=("lm", "cache_len", "shared"))
def prefill_prompts(lm, params, prompts: Array, prompt_len: Array, *, cache_len: int,
                    shared: int = 0):
  """Prompts [Q, P] (right-padded) -> (fp32 log-probs of the next token [Q, V], cache);
  `shared` first tokens common to every row are prefilled once (`decoding.prefill`)."""
  cache = new_cache(lm, prompts.shape[0], cache_len)
  logits, cache = prefill(lm, params, prompts, prompt_len, cache, shared=shared)
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), cache


@functools.partial(jax.jit, static_argnames=("lm",))
def score_starts(lm, params, cache, first_logp: Array, query: Array, tokens: Array,
                 span_len: Array, stop_id: Array) -> tuple[Array, Array, Array]:
  """One teacher-forced pass for a chunk of S start positions.

  cache: the prefilled prompts (Q rows); first_logp [Q, V]; query [S] (the prompt row of each
  start); tokens [S, L] = c_i .. c_{i+L-1} (padded); span_len [S] = how many of them form
  spans (0 for padding rows); stop_id: scalar int32.
  Returns (span NLL [S, L] with +inf past span_len, token NLL l [S, L], stop NLL e [S, L]);
  column t is the span c_i .. c_{i+t}.
  """
  S, L = tokens.shape
  rows = cache.take_rows(query)  # the prompt's cache, once per start
  positions = rows.lengths[:, None] + jnp.arange(L, dtype=jnp.int32)[None]
  logits = lm(params, tokens, positions, rows).logits.astype(jnp.float32)  # [S, L, V]
  lse = jax.nn.logsumexp(logits, axis=-1)  # [S, L]
  # l(i, i) from the prompt's last logits; l(i, i+t) (t >= 1) from position t - 1 of the pass
  first = -first_logp[query, tokens[:, 0]]  # [S]
  nxt = lse[:, :-1] - jnp.take_along_axis(logits[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
  tok_nll = jnp.concatenate([first[:, None], nxt], axis=1)  # [S, L]
  stop_nll = lse - logits[:, :, stop_id]  # [S, L]
  span = jnp.cumsum(tok_nll, axis=1) + stop_nll
  valid = jnp.arange(L)[None] < span_len[:, None]
  return jnp.where(valid, span, jnp.inf), tok_nll, stop_nll


# ------------------------------------------------------------------------------ search


@dataclasses.dataclass
class Span:
  """A passage span: tokens [start, end) of the passage tokenization, its NLL (span tokens
  plus stop), the ranking score (NLL, or NLL / (length + 1)) and per-token log-probs
  (the span's tokens, then the stop token)."""
  start: int
  end: int
  nll: float
  score: float
  logprobs: list[float]
  window: int = 0  # index of the query (window) it was scored in


def window_size(q: Query, s: ExactExtract, max_positions: int) -> int:
  """Passage tokens per window: `window_tokens`, capped so the prompt plus a span fits the
  model's context (a span of up to min(L_max, W) tokens follows the prompt)."""
  overhead = len(q.before) + len(q.after)
  room = max_positions - overhead
  L = s.max_span_tokens
  # largest W with W + min(L, W) <= room
  fit = room - L if L and room - L >= L else room // 2
  if room < 2 or fit < 1:
    raise GenerationError(f"the prompt without the passage has {overhead} tokens: no room for "
                          f"a passage and an answer in the model's {max_positions} positions")
  n = len(q.passage)
  if n + (min(L, n) if L else n) <= room and not (s.window_tokens and n > s.window_tokens):
    return n
  return min(fit, s.window_tokens) if s.window_tokens else fit


def windows(q: Query, s: ExactExtract, max_positions: int) -> list[Query]:
  """The queries of one example: the passage cut into windows (`window_size`), starting
  every `window_stride` tokens (default half a window), the last one reaching the end."""
  W = window_size(q, s, max_positions)
  n = len(q.passage)
  if W >= n:
    return [q]
  stride = s.window_stride or max(1, W // 2)
  starts = list(range(0, n - W, stride)) + [n - W]
  return [q.window(a, W) for a in starts]


def search(target: Target, queries: Sequence[Query], s: ExactExtract,
           batch_size: int = 8, share_prefix: bool = False,
           counts: Optional[dict[int, list[int]]] = None) -> list[list[Span]]:
  """Every example's spans ranked best first (at most `s.top_spans`); `queries` may hold
  several windows per example (`Query.example`, offsets into the example's passage).
  Returns one list per distinct example index, in order of first appearance.
  share_prefix: prefill the prompt prefix common to a group once (in-context examples).
  counts: if given, filled with {example: [starts scored, starts]} (what pruning saved)."""
  lm, params = target.lm, target.params
  if not target.eos_ids:
    raise GenerationError("exact_extract scores stopping after a span: the model needs an EOS id")
  stop_id = jnp.asarray(target.eos_ids[0], jnp.int32)
  for q in queries:
    ids = np.asarray(q.prompt_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= lm.vocab_size):
      raise GenerationError(f"example {q.example}: token ids outside [0, {lm.vocab_size})")
  order = list(dict.fromkeys(q.example for q in queries))
  found: dict[int, dict[tuple[int, int], Span]] = {e: {} for e in order}
  for g in range(0, len(queries), batch_size):
    group = list(queries[g:g + batch_size])
    spans_of, scored = _search_group(lm, params, group, s, stop_id, share_prefix)
    for k, spans in enumerate(spans_of):
      if counts is not None:
        c = counts.setdefault(group[k].example, [0, 0])
        c[0] += scored[k]
        c[1] += len(group[k].passage)
      best = found[group[k].example]
      for sp in spans:
        sp.window = g + k
        key = (sp.start, sp.end)
        if key not in best or sp.score < best[key].score:
          best[key] = sp
  return [sorted(found[e].values(), key=lambda sp: (sp.score, sp.start, sp.end))[:s.top_spans]
          for e in order]


def _search_group(lm, params, group: list[Query], s: ExactExtract, stop_id,
                  share_prefix: bool = False) -> tuple[list[list[Span]], list[int]]:
  """One prefill of the group's prompts, then the chunked passes over their starts (those
  pruning keeps). Returns each query's best spans and how many of its starts were scored."""
  Q = bucket(len(group), minimum=1)
  lens = [len(q.passage) for q in group]
  span_max = [min(s.max_span_tokens, n) if s.max_span_tokens else n for n in lens]
  L = bucket(max(span_max), minimum=4)
  longest = max(len(q.prompt_ids) for q in group)
  P, cache_len = plan_lengths(L, longest, lm.max_positions)
  prompts = np.zeros((Q, P), np.int32)
  plen = np.ones((Q,), np.int32)
  for k, q in enumerate(group):
    prompts[k, :len(q.prompt_ids)] = q.prompt_ids
    plen[k] = len(q.prompt_ids)
  shared = shared_prefix_len([q.prompt_ids for q in group]) if share_prefix else 0
  first_logp, cache = prefill_prompts(lm, params, jnp.asarray(prompts), jnp.asarray(plen),
                                      cache_len=cache_len, shared=shared)
  # one row per (query, start): the tokens from the start, and how many of them may be spans
  starts = [(k, i) for k, n in enumerate(lens) for i in range(n)]
  query_of = np.array([k for k, _ in starts], np.int32)
  span_len = np.array([min(span_max[k], lens[k] - i) for k, i in starts], np.int32)
  # a lower bound on the score of every span from each start: l(i, i) (see the module notes)
  first = -np.asarray(jax.device_get(first_logp), np.float64)[
      query_of, [group[k].passage[i] for k, i in starts]]
  bound = first / (span_len + 1) if s.length_normalize else first
  if s.prune_starts:  # best bound first, round-robin over the queries (early thresholds)
    rank = np.empty(len(starts), np.int64)
    for k in range(len(group)):
      rows = np.flatnonzero(query_of == k)
      rank[rows[np.argsort(bound[rows], kind="stable")]] = np.arange(len(rows))
    pending = np.lexsort((bound, rank))
  else:  # longest suffixes first: late starts then share short passes
    pending = np.argsort(-span_len, kind="stable")
  S = min(s.start_chunk, bucket(len(starts), minimum=1))
  pass_len = np.array([min(L, bucket(int(n), minimum=4)) for n in span_len], np.int64)
  nll = np.full((len(starts), L), np.inf, np.float32)
  tok, stop = np.zeros_like(nll), np.zeros_like(nll)
  threshold = np.full(len(group), np.inf)  # each query's top_spans-th best score so far
  found: list[list[np.ndarray]] = [[] for _ in group]
  scored = [0] * len(group)
  length = np.arange(1, L + 1)[None]
  regrouped = not s.prune_starts
  while len(pending):
    if not regrouped and any(scored):
      # The first pass (each query's best bounds) has set the cuts; from here on the order
      # only decides how soon they tighten, so group the remaining starts by pass length
      # (longest bucket first, best bound first within it): mixing lengths would make every
      # pass as long as its longest start.
      pending = pending[np.lexsort((bound[pending], -pass_len[pending]))]
      regrouped = True
    if s.prune_starts:  # a span tying the threshold could still enter the result; the margin
      # covers rounding in the device's log-sum-exp (the terms are >= 0 up to that)
      pending = pending[bound[pending] <= threshold[query_of[pending]] + PRUNE_MARGIN]
      if not len(pending):
        break
    chunk, pending = pending[:S], pending[S:]
    Lc = int(pass_len[chunk].max())
    query = np.zeros((S,), np.int32)
    tokens = np.zeros((S, Lc), np.int32)
    lens_c = np.zeros((S,), np.int32)
    for r, row in enumerate(chunk):
      k, i = starts[row]
      seg = group[k].passage[i:i + Lc]
      query[r], tokens[r, :len(seg)], lens_c[r] = k, seg, span_len[row]
    out = jax.device_get(score_starts(lm, params, cache, first_logp, jnp.asarray(query),
                                      jnp.asarray(tokens), jnp.asarray(lens_c), stop_id))
    for arr, dest in zip(out, (nll, tok, stop)):
      dest[chunk, :Lc] = np.asarray(arr)[:len(chunk)]
    score = nll[chunk] / (length + 1) if s.length_normalize else nll[chunk]
    for k in np.unique(query_of[chunk]):
      mine = score[query_of[chunk] == k]
      found[k].append(mine[np.isfinite(mine)])
      scored[k] += int(np.sum(query_of[chunk] == k))
      every = np.concatenate(found[k])
      if len(every) >= s.top_spans:
        threshold[k] = np.partition(every, s.top_spans - 1)[s.top_spans - 1]
  result: list[list[Span]] = [[] for _ in group]
  for k, q in enumerate(group):
    rows = np.flatnonzero(query_of == k)
    score = nll[rows] / (length + 1) if s.length_normalize else nll[rows]  # [n, L]
    flat = np.argsort(score, axis=None, kind="stable")
    flat = flat[np.isfinite(score.reshape(-1)[flat])][:s.top_spans]
    for f in flat:
      i, t = divmod(int(f), L)
      r = rows[i]
      lp = [-float(x) for x in tok[r, :t + 1]] + [-float(stop[r, t])]
      result[k].append(Span(q.offset + i, q.offset + i + t + 1, float(nll[r, t]),
                            float(score[i, t]), lp))
  return result, scored


# ---------------------------------------------------------------------------- strategy


def to_queries(target: Target, inputs: Sequence[Any], s: ExactExtract
               ) -> tuple[list[Query], list[tuple[int, ...]]]:
  """Every example's queries (windows; `example` = its position in `inputs`), and each
  example's whole passage tokenization."""
  out, passages = [], []
  for e, x in enumerate(inputs):
    if not isinstance(x, Query):
      if target.tokenizer is None:
        raise GenerationError("exact_extract on text needs the model's tokenizer (or give Query "
                              "token ids)")
      x = build_query(target.tokenizer, x["passage"], x["question"], x.get("examples", ()),
                      target.eos_ids[0] if target.eos_ids else None)
    passages.append(x.passage)
    out += windows(dataclasses.replace(x, example=e, offset=0), s, target.lm.max_positions)
  return out, passages


def exact_extract(s: ExactExtract, target: Target, inputs: Sequence[Any],
                  generate: Optional[Callable] = None, batch_size: int = 8,
                  share_prefix: bool = False) -> list[Generation]:
  """The best span of each input (a request dict or a `Query`) as a `Generation`:
  output_ids = the span's tokens then the stop token, token_logprobs their log-probs (so
  `nll` is the span's NLL), extras text (the span decoded, stripped), span [start, end)
  (token offsets into the passage tokenization, end exclusive), nll, top_spans (the best
  `top_spans` spans as {"text", "span", "nll"}, best first), and starts_scored / starts (the
  start positions scored after pruning, of all, summed over windows)."""
  check_inputs(inputs)
  if not target.eos_ids:
    raise GenerationError("exact_extract scores stopping after a span: the model needs an EOS id")
  queries, passages = to_queries(target, inputs, s)
  counts: dict[int, list[int]] = {}
  by_example = search(target, queries, s, batch_size, share_prefix, counts)
  tok = target.tokenizer
  stop = target.eos_ids[0]
  out = []
  for e, (spans, full) in enumerate(zip(by_example, passages)):
    text = lambda sp: tok.decode(list(full[sp.start:sp.end]), skip_special_tokens=True).strip() \
        if tok is not None else ""
    best = spans[0]
    window = queries[best.window]
    g = Generation(prompt_ids=window.prompt_ids,
                   output_ids=list(full[best.start:best.end]) + [stop],
                   token_logprobs=best.logprobs, processed_logprobs=list(best.logprobs),
                   score=-best.nll, finished=True, index=e)
    g.extras = dict(text=text(best), span=[best.start, best.end], nll=best.nll,
                    top_spans=[dict(text=text(sp), span=[sp.start, sp.end], nll=sp.nll)
                               for sp in spans],
                    starts_scored=counts[e][0], starts=counts[e][1])
    if s.length_normalize:
      g.extras["normalized_nll"] = best.score
    out.append(g)
  return out


def _pipeline(s: ExactExtract, target: Target, inputs, generate: Callable) -> list[Generation]:
  options = getattr(generate, "options", {})  # the request's (`decoding.runner.Stage`)
  if options.get("prompt_slots"):
    raise GenerationError("exact_extract pads each group of passages to its own length: "
                          "prompt_slots is not supported")
  return exact_extract(s, target, inputs, generate, options.get("batch_size", 8),
                       options.get("share_prefix", False))


STRATEGY = Strategy("exact_extract", ExactExtract, "the passage span of lowest NLL as an answer "
                    "(exact search over all spans, one pass per start)", pipeline=_pipeline,
                    check_inputs=check_inputs, shares_prefix=True)
