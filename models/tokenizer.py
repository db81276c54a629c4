"""Byte-level BPE tokenizer built from GGUF metadata.

The vocabulary, merges, token types, special-token ids and chat template are read from the
``tokenizer.*`` keys of a GGUF file and turned into a Hugging Face ``tokenizers.Tokenizer``
(byte-level BPE).  The pre-tokenizer (the regular expressions that cut text into words before BPE
runs) is chosen from ``tokenizer.ggml.pre``, the same way llama.cpp does it (``llm_tokenizer_bpe``
in ``src/llama-vocab.cpp``):

* ``smollm`` / ``starcoder``: first isolate every ``\\p{N}`` character, then the GPT-2 split
  regex.  This is what the original SmolLM2 / StarCoder ``tokenizer.json`` does with its
  ``Digits(individual_digits=True)`` + ``ByteLevel(use_regex=True)`` pre-tokenizers.
* ``gpt-2``: the GPT-2 split regex only.
* ``qwen2`` (and ``deepseek-r1-qwen``): the Qwen2 regex (single digits, letters with one leading
  non-letter, ...), plus the NFC normalizer of Qwen2's ``tokenizer.json``.
* ``llama-bpe`` (``llama3``, ``llama-v3``): the Llama-3 regex (digits in groups of up to three),
  with ``ignore_merges`` (a word that is itself a vocabulary entry is not merged piecewise).

Control tokens (``token_type`` 3) are registered as special tokens and user-defined tokens
(``token_type`` 4) as plain added tokens, so both are matched as single units inside text
(``<|im_start|>`` becomes one id instead of being spelled out).

Reading a path uses a small metadata-only GGUF parser (``read_gguf_metadata``): ``gguf.GGUFReader``
takes several seconds to index the ~100k strings of a vocabulary, the parser below well under a
second.  An already-open ``gguf.GGUFReader`` is accepted as well.
"""

from __future__ import annotations

import datetime
import json
import mmap
import os
import struct
from typing import Any, Iterable, Mapping, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

__all__ = [
    "Tokenizer",
    "GGUFFormatError",
    "read_gguf_metadata",
    "PRE_TOKENIZER_REGEXES",
]

# --------------------------------------------------------------------------------------------
# Pre-tokenizers, per tokenizer.ggml.pre name.
#
# llama.cpp (llm_tokenizer_bpe in src/llama-vocab.cpp) gives each pre-tokenizer type a list of
# regexes; each is applied in turn to the pieces the previous one produced, keeping both the
# matches and the text between them.  In `tokenizers` terms that is a Sequence of
# Split(regex, "isolated") steps followed by byte-level encoding.  Where the original Hugging Face
# tokenizer.json of the model family expresses the same thing with other components, we use those
# (they are the ground truth llama.cpp's regexes were written to reproduce):
#
#   smollm    llama.cpp: ["\p{N}", GPT2].  SmolLM2's tokenizer.json:
#             Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)], which is what
#             we build.  Digits isolates every numeric char (Rust's char::is_numeric, i.e.
#             \p{N}); ByteLevel's built-in regex is GPT2 below (llama.cpp's copy lacks the final
#             "|\s+", which only changes how a lone non-space whitespace char before a non-space
#             is labelled, not the pieces).
#   gpt2      llama.cpp: [GPT2]; tokenizer.json: ByteLevel(use_regex=True).
#   qwen2     llama.cpp: [QWEN2], the tokenizer.json regex with "(?i:'s|'t|...)" spelled out as
#             "(?:'[sS]|'[tT]|...)" (llama.cpp's engine lacks (?i:)); we use llama.cpp's form.
#             Qwen2's tokenizer.json also has an NFC normalizer, which we add (llama.cpp does not).
#   llama3    llama.cpp: [LLAMA3] (same adaptation), with ignore_merges.
# --------------------------------------------------------------------------------------------

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_QWEN2_REGEX = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: the llama.cpp regex list of each supported family (documentation; see _build_pre_tokenizer)
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "smollm": (r"\p{N}", _GPT2_REGEX),  # LLAMA_VOCAB_PRE_TYPE_SMOLLM / _STARCODER
    "gpt2": (_GPT2_REGEX,),  # LLAMA_VOCAB_PRE_TYPE_GPT2
    "qwen2": (_QWEN2_REGEX,),  # LLAMA_VOCAB_PRE_TYPE_QWEN2
    "llama3": (_LLAMA3_REGEX,),  # LLAMA_VOCAB_PRE_TYPE_LLAMA3
}


def _build_pre_tokenizer(family: str):
    if family == "smollm":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if family == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated", invert=False)
              for rx in PRE_TOKENIZER_REGEXES[family]]
    return pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


class _PreSpec:
    """How one tokenizer.ggml.pre name is tokenized (llama.cpp's per-name settings)."""

    def __init__(self, family: str, *, add_bos: bool = False, clean_spaces: bool = False,
                 ignore_merges: bool = False, nfc: bool = False) -> None:
        self.family = family
        self.add_bos = add_bos  # default when the GGUF has no tokenizer.ggml.add_bos_token
        self.clean_spaces = clean_spaces  # clean_up_tokenization_spaces on decode
        self.ignore_merges = ignore_merges
        self.nfc = nfc


# tokenizer.ggml.pre name -> settings.  add_bos / clean_spaces / ignore_merges follow the values
# llama.cpp assigns to each name (llama_vocab::impl::load); nfc follows the model's tokenizer.json.
_PRE_SPECS: dict[str, _PreSpec] = {
    "smollm": _PreSpec("smollm", clean_spaces=False),
    "starcoder": _PreSpec("smollm", clean_spaces=True),
    "gpt-2": _PreSpec("gpt2", clean_spaces=True),
    "qwen2": _PreSpec("qwen2", clean_spaces=False, nfc=True),
    "deepseek-r1-qwen": _PreSpec("qwen2", clean_spaces=False, nfc=True),
    "llama-bpe": _PreSpec("llama3", add_bos=True, clean_spaces=True, ignore_merges=True),
    "llama3": _PreSpec("llama3", add_bos=True, clean_spaces=True, ignore_merges=True),
    "llama-v3": _PreSpec("llama3", add_bos=True, clean_spaces=True, ignore_merges=True),
}

_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


# --------------------------------------------------------------------------------------------
# GGUF metadata
# --------------------------------------------------------------------------------------------


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this module can read."""


# GGUF value types (GGUFValueType): scalar struct codes; 8 = string, 9 = array
_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
               12: "d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: str | os.PathLike, prefixes: Sequence[str] | None = None
                       ) -> dict[str, Any]:
    """Read the key/value metadata of a GGUF file (GGUF v2 and v3, either byte order).

    Only the header is read; tensor data is not touched.  Values become Python objects (``int``,
    ``float``, ``bool``, ``str`` or lists of those).  With ``prefixes``, only keys starting with
    one of them are decoded (the others are skipped over) and returned.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file not found: {path!r}")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            raise GGUFFormatError(f"{path!r} is too small to be a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse_metadata(buf, path, None if prefixes is None else tuple(prefixes))
            except struct.error as e:  # ran off the end of the buffer
                raise GGUFFormatError(f"{path!r}: truncated or corrupt GGUF metadata") from e


def _parse_metadata(buf, path: str, prefixes: tuple[str, ...] | None) -> dict[str, Any]:
    if bytes(buf[:4]) != b"GGUF":
        raise GGUFFormatError(f"{path!r} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
    (version,) = struct.unpack_from("<I", buf, 4)
    endian = "<"
    if version & 0xFFFF == 0:  # written on a big-endian host
        endian = ">"
        (version,) = struct.unpack_from(">I", buf, 4)
    if version not in (2, 3):
        raise GGUFFormatError(f"{path!r}: unsupported GGUF version {version}")
    _n_tensors, n_kv = struct.unpack_from(endian + "QQ", buf, 8)
    pos = 24
    u32 = struct.Struct(endian + "I")
    u64 = struct.Struct(endian + "Q")

    def read_str(p: int) -> tuple[str, int]:
        (n,) = u64.unpack_from(buf, p)
        p += 8
        return bytes(buf[p:p + n]).decode("utf-8", errors="replace"), p + n

    def skip_str(p: int) -> int:
        return p + 8 + u64.unpack_from(buf, p)[0]

    def read_value(vtype: int, p: int, keep: bool) -> tuple[Any, int]:
        if vtype in _SCALAR_FMT:
            s = struct.Struct(endian + _SCALAR_FMT[vtype])
            return (s.unpack_from(buf, p)[0] if keep else None), p + s.size
        if vtype == _STRING:
            return read_str(p) if keep else (None, skip_str(p))
        if vtype == _ARRAY:
            (itype,) = u32.unpack_from(buf, p)
            (count,) = u64.unpack_from(buf, p + 4)
            p += 12
            if itype in _SCALAR_FMT:
                s = struct.Struct(f"{endian}{count}{_SCALAR_FMT[itype]}")
                return (list(s.unpack_from(buf, p)) if keep else None), p + s.size
            if itype == _STRING:
                if not keep:
                    for _ in range(count):
                        p = skip_str(p)
                    return None, p
                out = []
                for _ in range(count):
                    item, p = read_str(p)
                    out.append(item)
                return out, p
            out = []
            for _ in range(count):  # nested arrays: rare, decode generically
                item, p = read_value(itype, p, keep)
                out.append(item)
            return (out if keep else None), p
        raise GGUFFormatError(f"{path!r}: unknown GGUF value type {vtype}")

    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = read_str(pos)
        (vtype,) = u32.unpack_from(buf, pos)
        pos += 4
        keep = prefixes is None or key.startswith(prefixes)
        value, pos = read_value(vtype, pos, keep)
        if keep:
            meta[key] = value
    return meta


def _metadata_from_reader(reader, prefixes: Sequence[str] | None = None) -> dict[str, Any]:
    """The same dict as ``read_gguf_metadata``, taken from an open ``gguf.GGUFReader``."""
    prefixes = None if prefixes is None else tuple(prefixes)
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # GGUFReader's pseudo-fields for the header
            continue
        if prefixes is not None and not key.startswith(prefixes):
            continue
        types = [int(t) for t in field.types]
        if not types:
            continue

        def item(idx: int, vtype: int) -> Any:
            part = field.parts[idx]
            if vtype == _STRING:
                return bytes(part).decode("utf-8", errors="replace")
            v = part[0].item()
            return bool(v) if vtype == 7 else v

        if types[0] == _ARRAY:
            if len(types) < 2:
                meta[key] = []
            elif types[1] == _ARRAY:  # nested arrays are not used by tokenizers
                continue
            else:
                meta[key] = [item(i, types[1]) for i in field.data]
        else:
            meta[key] = item(field.data[0], types[0])
    return meta


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------


def _render_chat_template(template: str, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool, variables: Mapping[str, Any]) -> str:
    """Render a Jinja chat template the way Hugging Face's ``apply_chat_template`` does.

    Same Jinja settings (sandboxed, ``trim_blocks``, ``lstrip_blocks``, loop controls) and the same
    helpers templates rely on (``raise_exception``, ``tojson``, ``strftime_now``).
    """
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    compiled = env.from_string(template)
    return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                           **variables)


def _clean_up_tokenization(text: str) -> str:
    """Remove the space before punctuation and English contractions (HF's
    ``clean_up_tokenization_spaces=True``, llama.cpp's ``clean_spaces``)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                          (" 're", "'re")):
        text = text.replace(before, after)
    return text


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _split_merge(merge: str, vocab: Mapping[str, int]) -> tuple[str, str]:
    parts = merge.split(" ")
    if len(parts) == 2:
        return parts[0], parts[1]
    # a token containing a literal space (not produced by byte-level vocabularies): pick the split
    # whose two halves are both vocabulary entries
    for i, ch in enumerate(merge):
        if ch == " " and merge[:i] in vocab and merge[i + 1:] in vocab:
            return merge[:i], merge[i + 1:]
    raise ValueError(f"cannot parse GGUF merge rule {merge!r}")


class Tokenizer:
    """A byte-level BPE tokenizer (Hugging Face ``tokenizers``) built from GGUF metadata.

    Attributes:
        vocab_size: number of entries in ``tokenizer.ggml.tokens`` (the embedding rows).
        bos_id, eos_id, pad_id, unk_id: special ids from the GGUF (``None`` when absent).
        add_bos: whether ``encode(..., add_special_tokens=True)`` prepends ``bos_id``
            (``tokenizer.ggml.add_bos_token``; llama.cpp's per-model default when absent).
        add_eos: same for appending ``eos_id`` (``tokenizer.ggml.add_eos_token``, default False).
        special_ids: control tokens (token type 3) plus the bos/eos/pad ids; these are the ids
            ``decode(..., skip_special_tokens=True)`` drops.
        chat_template: the Jinja chat template (``tokenizer.chat_template``) or ``None``.
        pre: the ``tokenizer.ggml.pre`` name.
        tokens: the vocabulary as stored in the GGUF (byte-level strings), indexed by id.
        backend: the underlying ``tokenizers.Tokenizer``.
    """

    def __init__(self, metadata: Mapping[str, Any]) -> None:
        model = metadata.get("tokenizer.ggml.model")
        if model is None:
            raise ValueError("GGUF metadata has no tokenizer (tokenizer.ggml.model is missing)")
        if model != "gpt2":
            raise ValueError(
                f"unsupported tokenizer.ggml.model {model!r}: only byte-level BPE ('gpt2') "
                "vocabularies are supported")
        pre = metadata.get("tokenizer.ggml.pre")
        if pre not in _PRE_SPECS:
            raise ValueError(
                f"unsupported tokenizer.ggml.pre {pre!r}; supported: {sorted(_PRE_SPECS)}")
        spec = _PRE_SPECS[pre]
        self.pre: str = pre
        # the GGUF metadata it was built from (saved with trained checkpoints); None for HF dirs
        self.metadata: dict[str, Any] | None = dict(metadata)

        tokens = list(metadata["tokenizer.ggml.tokens"])
        n = len(tokens)
        for i, t in enumerate(tokens):
            if not t:  # llama.cpp's replacement for empty entries
                tokens[i] = f"[EMPTY_{i}]"
        token_types = list(metadata.get("tokenizer.ggml.token_type") or [1] * n)
        if len(token_types) != n:
            raise ValueError(
                f"tokenizer.ggml.token_type has {len(token_types)} entries for {n} tokens")
        self.tokens: list[str] = tokens
        self.vocab_size: int = n

        def opt_id(key: str) -> int | None:
            v = metadata.get(key)
            return int(v) if v is not None and 0 <= int(v) < n else None

        self.bos_id: int | None = opt_id("tokenizer.ggml.bos_token_id")
        self.eos_id: int | None = opt_id("tokenizer.ggml.eos_token_id")
        self.pad_id: int | None = opt_id("tokenizer.ggml.padding_token_id")
        self.unk_id: int | None = opt_id("tokenizer.ggml.unknown_token_id")
        add_bos = metadata.get("tokenizer.ggml.add_bos_token")
        self.add_bos: bool = bool(spec.add_bos if add_bos is None else add_bos)
        self.add_eos: bool = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        self.chat_template: str | None = metadata.get("tokenizer.chat_template")
        self.clean_up_tokenization_spaces: bool = spec.clean_spaces

        # -- BPE model -------------------------------------------------------------------------
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)  # first id wins for (malformed) duplicate entries
        merges = [_split_merge(m, vocab) for m in metadata.get("tokenizer.ggml.merges") or []]
        bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=spec.ignore_merges,
                         fuse_unk=False, byte_fallback=False)
        backend = _HFTokenizer(bpe)
        if spec.nfc:
            backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = _build_pre_tokenizer(spec.family)
        backend.decoder = decoders.ByteLevel()

        # -- special / added tokens ------------------------------------------------------------
        special = {i for i, tt in enumerate(token_types) if tt == _TOKEN_TYPE_CONTROL}
        special.update(i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None)
        user_defined = [i for i, tt in enumerate(token_types)
                        if tt == _TOKEN_TYPE_USER_DEFINED and i not in special]
        added = [AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special)]
        added += [AddedToken(tokens[i], special=False, normalized=False) for i in user_defined]
        if added:
            backend.add_tokens(added)
        # adding tokens whose text is already in the vocabulary must reuse their ids
        for a in added:
            got = backend.token_to_id(a.content)
            if got is None or tokens[got] != a.content:
                raise ValueError(f"could not register added token {a.content!r}")
        self.special_ids: set[int] = special
        self.backend = backend

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path_or_reader) -> "Tokenizer":
        """Build the tokenizer from a GGUF file path or an open ``gguf.GGUFReader``."""
        if isinstance(path_or_reader, (str, bytes, os.PathLike)):
            path = os.fsdecode(path_or_reader)
            meta = read_gguf_metadata(path, prefixes=("tokenizer.",))
        elif hasattr(path_or_reader, "fields"):
            meta = _metadata_from_reader(path_or_reader, prefixes=("tokenizer.",))
        else:
            raise TypeError(
                f"expected a path or a gguf.GGUFReader, got {type(path_or_reader).__name__}")
        return cls(meta)

    @classmethod
    def from_hf_dir(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Build from a Hugging Face model folder (``tokenizer.json`` plus, if present,
        ``tokenizer_config.json`` for the chat template, special tokens and ``add_bos_token``),
        for checkpoints loaded from safetensors."""
        directory = os.fspath(directory)
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        backend = _HFTokenizer.from_file(path)
        backend.no_padding()
        backend.no_truncation()
        conf: dict[str, Any] = {}
        conf_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(conf_path):
            with open(conf_path, encoding="utf-8") as f:
                conf = json.load(f)

        def tok_id(key: str) -> int | None:
            v = conf.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            return backend.token_to_id(v) if isinstance(v, str) else None

        self = cls.__new__(cls)
        self.pre = "hf-json"
        self.metadata = None
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        vocab = backend.get_vocab(with_added_tokens=True)
        self.tokens = [""] * self.vocab_size
        for t, i in vocab.items():
            if 0 <= i < self.vocab_size:
                self.tokens[i] = t
        self.bos_id, self.eos_id = tok_id("bos_token"), tok_id("eos_token")
        self.pad_id, self.unk_id = tok_id("pad_token"), tok_id("unk_token")
        self.add_bos = bool(conf.get("add_bos_token", False)) and self.bos_id is not None
        self.add_eos = bool(conf.get("add_eos_token", False))
        self.chat_template = conf.get("chat_template")
        self.clean_up_tokenization_spaces = False
        special = {int(k) for k, v in (conf.get("added_tokens_decoder") or {}).items()
                   if v.get("special")}
        special.update(i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None)
        self.special_ids = special
        self.backend = backend
        return self

    # ---- encoding / decoding -----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``.  Special tokens written in the text (``<|im_start|>``) are
        matched as single ids.  ``add_special_tokens`` prepends BOS only if ``add_bos`` (and
        appends EOS only if ``add_eos``)."""
        return self._add_special(self.backend.encode(text, add_special_tokens=False).ids,
                                 add_special_tokens)

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True
                     ) -> list[list[int]]:
        """``encode`` for several texts (parallel in the Rust backend)."""
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._add_special(e.ids, add_special_tokens) for e in encs]

    def _add_special(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        if add_special_tokens:
            if self.add_bos and self.bos_id is not None:
                ids = [self.bos_id] + ids
            if self.add_eos and self.eos_id is not None:
                ids = ids + [self.eos_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (any iterable of ints, e.g. a list or a 1-D array)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        text = self.backend.decode(ids, skip_special_tokens=False)
        if self.clean_up_tokenization_spaces:
            text = _clean_up_tokenization(text)
        return text

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (byte-level spelling, e.g. ``'Ġthe'``) or added token."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id`` as stored in the GGUF."""
        return self.tokens[token_id]

    # ---- chat ----------------------------------------------------------------------------

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_vars: Any) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) with the GGUF's chat
        template.  ``bos_token`` / ``eos_token`` / ``pad_token`` / ``unk_token`` are available to
        the template, as in Hugging Face; extra keyword arguments become template variables."""
        if self.chat_template is None:
            raise ValueError("this GGUF has no tokenizer.chat_template")
        variables = {
            "bos_token": self._token_text(self.bos_id),
            "eos_token": self._token_text(self.eos_id),
            "pad_token": self._token_text(self.pad_id),
            "unk_token": self._token_text(self.unk_id),
        }
        variables.update(template_vars)
        return _render_chat_template(self.chat_template, messages, add_generation_prompt,
                                     variables)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    **template_vars: Any) -> list[int]:
        """Ids of the rendered chat.  Like Hugging Face's ``apply_chat_template(tokenize=True)``
        no BOS is added: templates that want one write it themselves."""
        text = self.apply_chat_template(messages, add_generation_prompt, **template_vars)
        return self.encode(text, add_special_tokens=False)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(pre={self.pre!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id},"
                f" eos_id={self.eos_id}, pad_id={self.pad_id}, add_bos={self.add_bos})")
