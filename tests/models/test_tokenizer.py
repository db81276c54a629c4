"""Tests for models/tokenizer.py: the GGUF-built byte-level BPE tokenizer.

The reference is Hugging Face ``transformers`` loading the SAME GGUF file
(``AutoTokenizer.from_pretrained(dir, gguf_file=name)``), with two known defects of transformers
4.55's GGUF tokenizer conversion for SmolLM2 worked around (details at each test):

1. it ignores ``tokenizer.ggml.add_bos_token = false`` and prepends ``<|im_start|>`` (id 1), so the
   HF side is always called with ``add_special_tokens=False``;
2. it drops SmolLM2's ``Digits(individual_digits=True)`` pre-tokenizer (keeps a bare GPT-2
   ``ByteLevel``), which changes the ids wherever a whitespace run, or a space before a non-ASCII
   numeric char, precedes a digit (``"x =  42"``, ``"    1"``, ``"a\\n\\n2"``, ``" ½"``).  The
   ground truth there is the original SmolLM2 tokenizer (= llama.cpp's "smollm" regexes), checked
   with hard-coded ids, an independent pure-Python implementation of llama.cpp's splitting, and
   HF's own converted tokenizer with the Digits step put back.
   Its decode also defaults to ``clean_up_tokenization_spaces=True`` (SmolLM2's config and
   llama.cpp's "smollm" both say false), so HF decodes are compared with that flag off.
"""

from __future__ import annotations

import os
import random
import time
import unicodedata

# The HF reference must never try the network (these machines are offline); huggingface_hub reads
# this when it is first imported, so set it before anything imports transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from models.tokenizer import (
    PRE_TOKENIZER_REGEXES,
    GGUFFormatError,
    Tokenizer,
    read_gguf_metadata,
)

# ------------------------------------------------------------------------------------------------
# fixtures (module scope: the GGUF and the HF tokenizer are loaded once)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_path(smollm_gguf) -> str:
    """SmolLM2-135M-Instruct's GGUF file (tests/conftest.py; its tests are `real_model`)."""
    return smollm_gguf


@pytest.fixture(scope="module")
def tok(gguf_path) -> Tokenizer:
    t0 = time.perf_counter()
    t = Tokenizer.from_gguf(gguf_path)
    print(f"\n[decodax] Tokenizer.from_gguf: {time.perf_counter() - t0:.2f}s")
    return t


@pytest.fixture(scope="module")
def hf_tok(gguf_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    t0 = time.perf_counter()
    # Passing the config only saves time: without it AutoTokenizer parses the whole GGUF a second
    # time (~6 s) just to learn that the architecture is "llama" and pick LlamaTokenizerFast. The
    # resulting tokenizer is identical (checked: same tokenizer JSON and chat template).
    hf = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
        config=transformers.LlamaConfig())
    print(f"\n[decodax] HF AutoTokenizer from GGUF: {time.perf_counter() - t0:.2f}s")
    return hf


@pytest.fixture(scope="module")
def hf_fixed(hf_tok):
    """HF's converted tokenizer with SmolLM2's original pre-tokenizer restored
    (tokenizer.json: Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)])."""
    from tokenizers import Tokenizer as HFBackend
    from tokenizers import pre_tokenizers

    backend = HFBackend.from_str(hf_tok.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return backend


# ------------------------------------------------------------------------------------------------
# test texts
# ------------------------------------------------------------------------------------------------

# Texts on which transformers' GGUF conversion agrees with the original tokenizer.
TEXTS = [
    "Hello world",
    " Hello world",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    # contractions (case-sensitive in the GPT-2 regex)
    "I'm sure they'll say it's fine, don't you think? We've seen it. You'd know.",
    "I'M SURE THEY'LL SAY IT'S FINE, DON'T YOU? a'lL We'Ve",
    # accents, other scripts, emoji
    "Café naïve résumé façade Ångström déjà vu",
    "Straße, Äpfel, Øresund, ﬁnance, Ελληνικά, русский язык",
    "你好，世界！这是一个测试。日本語のテキストとカタカナ。한국어 텍스트입니다",
    "مرحبا بالعالم — שלום עולם — नमस्ते दुनिया",
    "Emoji: 🦙🚀 👍🏽 🇫🇷 😶\u200d🌫️ ✅ and a lone 🦙.",
    # whitespace runs (multiple spaces, tabs, newlines, CR)
    "two  spaces,   three,    four,\ttab,\t\ttwo tabs",
    "line one\nline two\n\nline four\r\nwindows\rmac",
    "   leading and trailing   ",
    "\n\n\n",
    " ",
    "\t",
    "",
    "trailing newline\n",
    "mixed \t \n \t\n  end",
    # code with indentation
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class Foo:\n\tdef bar(self):\n\t\tpass  # comment\n",
    "for (int i = 0; i < n; ++i) {\n    sum += a[i] * b[i];\n}\n",
    'x = {"key": [1, 2, 3], "other": None}\nprint(f"{x!r:>10}")',
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    "<div class=\"a\">&nbsp;</div> <!-- html -->",
    # digits / numbers (single spaces before them: no conversion difference)
    "3 33 333 3333 33333 333333 3333333 33333333",
    "3.14159 2.71828 1e-9 0x1F 1,000,000 -42 +7 50%",
    "Call 555-0123 or +1 (800) 555-0199 before 2024-12-31T23:59:59Z.",
    "a1b2c3 v2.0.1 x86_64 md5sum",
    # punctuation runs
    "------======= ''''''```````\"\"\"\"......!!!!!!??????",
    "Wait... what?! (really) [yes] {no} <maybe> @user #tag $5 ^_^ ~/path\\to\\file",
]

# Texts where transformers 4.55's GGUF conversion is wrong (no Digits pre-tokenizer), with the
# ids of the original SmolLM2 tokenizer / llama.cpp "smollm".  Piece by piece, e.g. "x =  42":
# Digits first cuts "x =  " | "4" | "2", then the GPT-2 regex makes "x" " =" "  " of the first part,
# so the two spaces are one token ("ĠĠ", 256); without Digits the regex sees "  42" and splits the
# whitespace run before the number ("Ġ" "Ġ42" -> 216 216 36 34).
DIGIT_BOUNDARY_CASES = {
    "x =  42": [104, 446, 256, 36, 34],
    "    1": [289, 33],
    "a\n\n2": [81, 1116, 34],
    "ied 4 ½ months": [885, 216, 36, 216, 16738, 2704],
    "x  ²": [104, 256, 19133],
    " \r3": [26410, 35],
}


def _fuzz_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = (list("abcXYZ 0123456789\t\n\r  .,;:'\"!?()[]{}<>-_+=*/\\|@#$%^&~`")
                + list("éàüßñçøåÆ世界你好日本語한국어")
                + ["🦙", "👍🏽", "🇫🇷", "\u200b", "\u00a0", "\u3000", "½", "²", "٣", "४", "Ⅻ",
                   "①", "𝟘", "０", "'s", "'LL", "    ", "\n\n", "<|im_start|>", "<|im_end|>"])
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# metadata
# ------------------------------------------------------------------------------------------------


def test_metadata(tok, hf_tok):
    assert tok.pre == "smollm"
    assert tok.vocab_size == 49152 == len(hf_tok)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)
    assert tok.add_bos is False
    assert tok.special_ids == set(range(17))  # the 17 control tokens (token_type 3)
    assert tok.id_to_token(1) == "<|im_start|>" and tok.token_to_id("<|im_end|>") == 2
    assert tok.chat_template == hf_tok.chat_template
    assert tok.chat_template.startswith("{% for message in messages %}")


def test_path_and_reader_metadata_agree(tmp_path):
    """The fast metadata parser returns what gguf.GGUFReader reads, for every value type and both
    byte orders (small synthetic files: GGUFReader takes seconds on a real vocabulary)."""
    gguf = pytest.importorskip("gguf")
    from models.tokenizer import _metadata_from_reader

    for endian in (gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG):
        path = tmp_path / f"meta-{endian.name}.gguf"
        w = gguf.GGUFWriter(str(path), arch="llama", endianess=endian)
        w.add_uint8("t.u8", 200)
        w.add_int8("t.i8", -5)
        w.add_uint16("t.u16", 60000)
        w.add_int16("t.i16", -30000)
        w.add_uint32("t.u32", 4_000_000_000)
        w.add_int32("t.i32", -2_000_000_000)
        w.add_uint64("t.u64", 2**63 + 5)
        w.add_int64("t.i64", -(2**62))
        w.add_float32("t.f32", 1.5)
        w.add_float64("t.f64", -2.25)
        w.add_bool("t.bool", True)
        w.add_string("t.str", "héllo ✓")
        w.add_array("t.arr_i", [1, -2, 3])
        w.add_array("t.arr_s", ["a", "", "ü 𝟘"])
        w.add_array("t.arr_f", [0.5, 1.5])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

        fast = read_gguf_metadata(path)
        slow = _metadata_from_reader(gguf.GGUFReader(str(path)))
        assert fast == slow
        assert fast["general.architecture"] == "llama"
        assert fast["t.u64"] == 2**63 + 5 and fast["t.i8"] == -5 and fast["t.bool"] is True
        assert fast["t.str"] == "héllo ✓" and fast["t.arr_s"] == ["a", "", "ü 𝟘"]
        assert fast["t.arr_i"] == [1, -2, 3] and fast["t.arr_f"] == [0.5, 1.5]
        assert read_gguf_metadata(path, prefixes=("t.s",)) == {"t.str": "héllo ✓"}


# ------------------------------------------------------------------------------------------------
# encoding vs Hugging Face
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_hf(tok, hf_tok, text):
    # add_special_tokens=False on the HF side: transformers 4.55's GGUF tokenizer ignores
    # add_bos_token=false and would prepend <|im_start|> (id 1); SmolLM2 adds no BOS.
    expected = hf_tok.encode(text, add_special_tokens=False)
    assert tok.encode(text) == expected
    assert tok.encode(text, add_special_tokens=False) == expected


def test_no_bos_added(tok, hf_tok):
    ids = tok.encode("Hello", add_special_tokens=True)
    assert ids == tok.encode("Hello", add_special_tokens=False)
    assert ids[0] != tok.bos_id
    # the transformers 4.55 defect we work around (documented; harmless if fixed upstream)
    hf_ids = hf_tok.encode("Hello", add_special_tokens=True)
    assert hf_ids in (ids, [1] + ids)


@pytest.mark.parametrize("text,expected", list(DIGIT_BOUNDARY_CASES.items()))
def test_digit_boundaries_follow_original_tokenizer(tok, hf_fixed, text, expected):
    assert tok.encode(text) == expected
    assert hf_fixed.encode(text, add_special_tokens=False).ids == expected


@pytest.mark.xfail(reason="transformers 4.55 GGUF conversion drops SmolLM2's Digits(individual_"
                          "digits) pre-tokenizer; the ids differ before digits", strict=False)
def test_hf_gguf_conversion_digit_boundaries(hf_tok):
    got = {t: hf_tok.encode(t, add_special_tokens=False) for t in DIGIT_BOUNDARY_CASES}
    assert got == DIGIT_BOUNDARY_CASES


def test_fuzz_matches_original_pipeline(tok, hf_fixed):
    texts = _fuzz_texts(1500)
    ours = tok.encode_batch(texts, add_special_tokens=False)
    ref = [e.ids for e in hf_fixed.encode_batch(texts, add_special_tokens=False)]
    bad = [(t, a, b) for t, a, b in zip(texts, ours, ref) if a != b]
    assert not bad, bad[:3]
    assert ours == [tok.encode(t, add_special_tokens=False) for t in texts]


# ------------------------------------------------------------------------------------------------
# pre-tokenizer vs llama.cpp's regexes, implemented independently with the `regex` module
# ------------------------------------------------------------------------------------------------


def _llama_cpp_split(text: str, expressions) -> list[str]:
    """llama.cpp's unicode_regex_split: each regex splits every current piece into its matches
    and the unmatched text between them."""
    import regex

    pieces = [text]
    for expr in expressions:
        out = []
        for piece in pieces:
            pos = 0
            for m in regex.finditer(expr, piece):
                if m.start() > pos:
                    out.append(piece[pos:m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                pos = m.end()
            if pos < len(piece):
                out.append(piece[pos:])
        pieces = out
    return pieces


# llama.cpp's GPT-2 expression, verbatim (without the trailing "|\s+" of tokenizers' ByteLevel)
_LLAMA_CPP_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA_CPP_REGEXES = {
    "smollm": (r"\p{N}", _LLAMA_CPP_GPT2),
    "gpt2": (_LLAMA_CPP_GPT2,),
    "qwen2": PRE_TOKENIZER_REGEXES["qwen2"],
    "llama3": PRE_TOKENIZER_REGEXES["llama3"],
}


@pytest.mark.parametrize("family", sorted(_LLAMA_CPP_REGEXES))
def test_pre_tokenizer_matches_llama_cpp_regexes(family):
    pytest.importorskip("regex")
    from models.tokenizer import _build_pre_tokenizer

    pre = _build_pre_tokenizer(family)
    texts = TEXTS + list(DIGIT_BOUNDARY_CASES) + _fuzz_texts(400, seed=1)
    for text in texts:
        ours = [text[s:e] for _, (s, e) in pre.pre_tokenize_str(text)]
        assert ours == _llama_cpp_split(text, _LLAMA_CPP_REGEXES[family]), text


def test_pre_tokenizer_examples():
    from models.tokenizer import _build_pre_tokenizer

    def split(family, text):
        return [text[s:e] for _, (s, e) in _build_pre_tokenizer(family).pre_tokenize_str(text)]

    text = "x =  42 ½\t\t3"
    assert split("smollm", text) == ["x", " =", "  ", "4", "2", " ", "½", "\t\t", "3"]
    assert split("gpt2", text) == ["x", " =", " ", " 42", " ½", "\t", "\t", "3"]
    assert split("qwen2", "12345 abc I'M") == ["1", "2", "3", "4", "5", " abc", " I", "'M"]
    assert split("llama3", "12345 abc I'M") == ["123", "45", " abc", " I", "'M"]
    assert split("gpt2", "12345 abc I'M") == ["12345", " abc", " I", "'", "M"]


# ------------------------------------------------------------------------------------------------
# special tokens
# ------------------------------------------------------------------------------------------------

SPECIAL_TEXTS = [
    "<|im_start|>user\nHello there<|im_end|>\n",
    "before<|endoftext|>after",
    "<repo_name>decodax<file_sep>models/tokenizer.py\nimport os<|endoftext|>",
    "<jupyter_start><jupyter_code>print(1)<jupyter_output>1<empty_output>",
    "space before <|im_end|> and after",
    "not special: <|im_start and im_end|> <| im_start |>",
]


@pytest.mark.parametrize("text", SPECIAL_TEXTS)
def test_special_tokens_in_text(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    for name in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>"):
        if name in text:
            assert tok.token_to_id(name) in ids
    assert tok.decode(ids) == text


def test_every_control_token_is_one_id(tok):
    for i in sorted(tok.special_ids):
        assert tok.encode(tok.id_to_token(i)) == [i]
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_start") != [1]


# ------------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS + SPECIAL_TEXTS + list(DIGIT_BOUNDARY_CASES))
def test_decode_round_trip(tok, hf_tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # clean_up_tokenization_spaces=False: SmolLM2's tokenizer_config and llama.cpp's "smollm"
    # do not clean up; transformers 4.55's GGUF conversion defaults it to True (" ?" -> "?").
    assert tok.decode(ids) == hf_tok.decode(ids, clean_up_tokenization_spaces=False)
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(
        ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_decode_variants(tok):
    ids = tok.encode("<|im_start|>assistant\nHi 👋<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\nHi 👋"
    np = pytest.importorskip("numpy")
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == tok.decode(ids)
    assert tok.decode([]) == ""
    # a token that ends inside a multi-byte character decodes to U+FFFD, like HF
    emoji_ids = tok.encode("🦙")
    assert len(emoji_ids) > 1 and "\ufffd" in tok.decode(emoji_ids[:1])


def test_fuzz_round_trip(tok):
    texts = _fuzz_texts(500, seed=2)
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert tok.decode(ids) == text


# ------------------------------------------------------------------------------------------------
# chat template
# ------------------------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "What's 2+2?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name a prime number."}],
    [{"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write code:\n```python\ndef f(x):\n    return  x  * 2\n```"}],
    [{"role": "user", "content": "Unicode: café 你好 🦙, numbers: 12  34"}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chat_template_matches_hf(tok, hf_tok, conv, add_generation_prompt):
    messages = CONVERSATIONS[conv]
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ids == tok.encode(text, add_special_tokens=False)
    if "  34" not in text:  # HF's digit-boundary defect (see module docstring)
        assert ids == list(hf_tok.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt))
    assert ids[0] == tok.token_to_id("<|im_start|>")
    if add_generation_prompt:
        assert text.endswith("<|im_start|>assistant\n")


def test_chat_template_default_system_prompt(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    "Hugging Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------------
# errors, other GGUFs, the GGUFReader path
# ------------------------------------------------------------------------------------------------


def test_missing_file_raises_file_not_found(tmp_path):
    missing = tmp_path / "no-such-model.gguf"
    with pytest.raises(FileNotFoundError, match="no-such-model.gguf"):
        Tokenizer.from_gguf(missing)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_gguf(str(missing))


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        Tokenizer.from_gguf(bad)
    with pytest.raises(TypeError):
        Tokenizer.from_gguf(12345)


def _tiny_metadata(pre: str = "smollm", **extra) -> dict:
    """A small byte-level vocabulary: 3 control tokens, 256 byte symbols, 4 merges, 1
    user-defined token."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he", "1 2"]
    tokens += ["Ġt", "he", "Ġthe", "12", "<tool>"]
    types = [3, 3, 3] + [1] * (len(tokens) - 4) + [4]
    meta = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                                   "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                                   "{% if add_generation_prompt %}<|im_start|>assistant\n"
                                   "{% endif %}",
    }
    meta.update(extra)
    return meta


def _write_gguf(path, meta: dict) -> None:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    if "tokenizer.ggml.add_bos_token" in meta:
        w.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    w.add_chat_template(meta["tokenizer.chat_template"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_from_path_and_from_reader(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, _tiny_metadata(**{"tokenizer.ggml.add_bos_token": False}))
    a = Tokenizer.from_gguf(path)
    b = Tokenizer.from_gguf(gguf.GGUFReader(str(path)))
    text = "the the 12<|im_start|><tool>"
    for t in (a, b):
        assert t.tokens == a.tokens and t.special_ids == {0, 1, 2}
        assert (t.bos_id, t.eos_id, t.pad_id, t.add_bos) == (1, 2, None, False)
        ids = t.encode(text)
        pieces = [t.id_to_token(i) for i in ids]
        # smollm: digits isolated, so "12" is not merged
        assert pieces == ["t", "he", "Ġthe", "Ġ", "1", "2", "<|im_start|>", "<tool>"]
        assert t.decode(ids) == text
        # the user-defined <tool> is matched in text but is not a special token
        assert t.decode(ids, skip_special_tokens=True) == "the the 12<tool>"
        msgs = [{"role": "user", "content": "the"}]
        chat = "<|im_start|>user\nthe<|im_end|>\n<|im_start|>assistant\n"
        assert t.apply_chat_template(msgs) == chat
        assert t.encode_chat(msgs) == t.encode(chat, add_special_tokens=False)
        assert t.decode(t.encode_chat(msgs)) == chat


def test_other_pre_tokenizers_and_bos():
    # llama-bpe: digits in groups of up to 3 ("12" merges), BOS added by default
    t = Tokenizer(_tiny_metadata("llama-bpe"))
    assert t.add_bos is True
    ids = t.encode("the 12")
    assert ids[0] == 1 and [t.id_to_token(i) for i in ids[1:]] == ["t", "he", "Ġ", "12"]
    assert t.encode("the 12", add_special_tokens=False) == ids[1:]
    # ...unless the GGUF says otherwise
    assert Tokenizer(_tiny_metadata("llama-bpe", **{"tokenizer.ggml.add_bos_token": False})
                     ).encode("the") == [t.token_to_id("t"), t.token_to_id("he")]
    # qwen2: single digits, NFC normalisation, no BOS
    q = Tokenizer(_tiny_metadata("qwen2"))
    assert q.add_bos is False
    assert [q.id_to_token(i) for i in q.encode("the 12")] == ["t", "he", "Ġ", "1", "2"]
    assert q.encode(unicodedata.normalize("NFD", "é")) == q.encode("é")


def test_unsupported_tokenizers_raise_value_error():
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'deepseek-llm'"):
        Tokenizer(_tiny_metadata("deepseek-llm"))
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'llama'"):
        Tokenizer(_tiny_metadata(**{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(ValueError, match="tokenizer.ggml.model is missing"):
        Tokenizer({})
    meta = _tiny_metadata()
    del meta["tokenizer.chat_template"]
    with pytest.raises(ValueError, match="chat_template"):
        Tokenizer(meta).apply_chat_template([{"role": "user", "content": "x"}])


# ------------------------------------------------------------------------------------------------
# optional: llama.cpp's tokenizer test vectors for other vocabularies
# ------------------------------------------------------------------------------------------------
# Set DECODAX_LLAMA_CPP_VOCABS to a folder holding llama.cpp's models/ggml-vocab-*.gguf with their
# .inp/.out files (e.g. from `pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36`,
# vendor/llama.cpp/models/).  The expected ids were made by HF from each original tokenizer.json.

_VOCAB_DIR = os.environ.get("DECODAX_LLAMA_CPP_VOCABS")


@pytest.mark.skipif(not _VOCAB_DIR, reason="DECODAX_LLAMA_CPP_VOCABS not set")
@pytest.mark.parametrize("name", ["starcoder", "gpt-2", "qwen2", "llama-bpe"])
def test_llama_cpp_vocab_vectors(name):
    base = os.path.join(_VOCAB_DIR, f"ggml-vocab-{name}.gguf")
    if not os.path.exists(base):
        pytest.skip(f"{base} not found")
    t = Tokenizer.from_gguf(base)
    with open(base + ".inp", encoding="utf-8") as f:
        inputs = f.read().split("\n__ggml_vocab_test__\n")
    with open(base + ".out", encoding="utf-8") as f:
        outputs = f.read().split("\n")
    inputs[-1] = inputs[-1].removesuffix("\n__ggml_vocab_test__")
    for text, line in zip(inputs, outputs):
        assert t.encode(text, add_special_tokens=False) == [int(v) for v in line.split()], text
