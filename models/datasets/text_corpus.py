"""English prose for language-model training: Jane Austen's six novels, one record per chapter.

Source
  The Debian package ``r-cran-janeaustenr`` (version 1.0.0-1 in Debian 12; the CRAN package
  ``janeaustenr`` 1.0.0 by Julia Silge, MIT licence), installed with
  ``apt-get install -y --no-install-recommends r-cran-janeaustenr``
  (``--no-install-recommends`` keeps it to R's core, ~55 MB, instead of ~700 packages).  R
  itself is not used: the package's lazy-load data base
  ``/usr/lib/R/site-library/janeaustenr/data/Rdata.{rdx,rdb}`` is decoded here in Python
  (``read_r_lazyload_db``).  It holds the Project Gutenberg texts of the novels, one character
  vector of lines per novel, already without Gutenberg's header and licence boilerplate:
  *Sense and Sensibility* (1811), *Pride and Prejudice* (1813), *Mansfield Park* (1814),
  *Emma* (1815), *Northanger Abbey* (1817) and *Persuasion* (1817).  The novels are in the
  public domain.  The decoded lines are checked against a sha256 (``SHA256``), so a different
  package version is reported instead of silently giving other text.

Size
  4.0 MB of text as stored; after cleaning 4.0 MB in 269 chapters, about 717k words and 0.92M
  SmolLM2 tokens (train 240, validation 11, test 18 chapters).

Cleaning (``clean_novel``), deterministic
  * Everything before the first chapter heading is dropped (title, author, Northanger Abbey's
    "Advertisement"), and so is the editor's "A NOTE ON THE TEXT" closing Northanger Abbey and
    the final "THE END" / "FINIS" lines.
  * Chapter headings (``CHAPTER XII``, ``Chapter 3``) start a new document and are not part of
    its text; ``VOLUME I`` headings are dropped.
  * Editorial notes in square brackets about the edition's volume breaks
    (``[At this point in the first and second editions, ...]``, ``[End volume one ...]``) are
    dropped.
  * Underscores marking italics (``_you_``) are removed.
  * Hard-wrapped lines are unwrapped: each paragraph (blank-line separated) becomes one line,
    whitespace runs become one space, and paragraphs are joined by ``"\\n\\n"``.

Documents and splits
  One document per chapter, ``id = "<novel>/<chapter number, 3 digits>"`` with the novel's
  ``janeaustenr`` name and the chapter's 1-based position in the novel (Emma's three volumes
  are numbered through, 1..55), e.g. ``"prideprejudice/001"``.  A document goes to
  ``validation`` when ``sha256(id) mod 100`` is in 90..94, to ``test`` when in 95..99 and to
  ``train`` otherwise (``split_of``), so splits are disjoint, stable when other documents change,
  and mix all six novels.  Records are in novel order (alphabetical ``janeaustenr`` name), then
  chapter order.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import struct
import zlib
from typing import Any

import tensorflow_datasets as tfds

from models.datasets._common import LocalSourceBuilder, check_sha256, require_files

#: where the Debian package installs the R lazy-load data base
SOURCE_DIR = "/usr/lib/R/site-library/janeaustenr/data"
PACKAGE = "r-cran-janeaustenr"
INSTALL = f"the Debian package: apt-get install -y --no-install-recommends {PACKAGE}"
FILES = ("Rdata.rdx", "Rdata.rdb")

#: janeaustenr object name -> title, in record order
NOVELS = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}
#: chapters per novel after cleaning
NUM_CHAPTERS = {"emma": 55, "mansfieldpark": 48, "northangerabbey": 31, "persuasion": 24,
                "prideprejudice": 61, "sensesensibility": 50}

#: sha256 of ``source_bytes`` of the decoded novels
SHA256 = "1a6c2c61283a30027128cb82e6b20872fce2bb965485b56d5bbcc6188c8b2e65"

#: split -> [lo, hi) of sha256(id) mod 100
SPLIT_BUCKETS = {"train": (0, 90), "validation": (90, 95), "test": (95, 100)}

# ------------------------------------------------------------------------------------------
# R lazy-load data bases (what R's lazyLoad() reads)
#
# ``<name>.rdx`` is a gzip-compressed serialized R list: ``variables`` (object name -> integer
# (offset, length) into ``<name>.rdb``), ``references`` and ``compressed``.  Each ``.rdb`` blob
# is a 4-byte big-endian uncompressed length followed by zlib data (``compressed`` TRUE), and
# decompresses to one object in R's XDR serialization format ("X\n", versions 2 and 3).
# Only what data sets use is decoded: vectors (logical, integer, double, character, list),
# pairlists (attributes), symbols and references.
# ------------------------------------------------------------------------------------------

_NILVALUE, _REFSXP = 254, 255
_SPECIAL = {242, 241, 253, 252, 251}  # empty/base/global env, unbound value, missing arg
_SYMSXP, _LISTSXP, _LANGSXP, _CHARSXP = 1, 2, 6, 9
_LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP, _EXPRSXP = 10, 13, 14, 16, 19, 20
_LATIN1_MASK = 1 << 2


class RVector(list):
  """An R vector as a Python list, with its R type code and attributes (a dict)."""

  def __init__(self, values, sexptype: int, attributes: dict[str, Any] | None = None) -> None:
    super().__init__(values)
    self.sexptype = sexptype
    self.attributes = attributes or {}


class _RUnserializer:
  """Decoder of R's XDR serialization format (the subset used by data sets)."""

  def __init__(self, data: bytes) -> None:
    if data[:2] != b"X\n":
      raise ValueError(f"not an XDR-serialized R object (header {data[:2]!r})")
    self.data, self.pos, self.refs = data, 2, []
    version = self._int()
    self._int(), self._int()  # writer version, minimal reader version
    if version == 3:
      n = self._int()  # then the native encoding's name
      self.pos += n
    elif version != 2:
      raise ValueError(f"unsupported R serialization version {version}")

  def _int(self) -> int:
    (v,) = struct.unpack_from(">i", self.data, self.pos)
    self.pos += 4
    return v

  def _attributes(self, pairlist) -> dict[str, Any]:
    return {tag: value for tag, value in (pairlist or [])}

  def read(self) -> Any:
    flags = self._int()
    sexptype = flags & 0xFF
    has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
    if sexptype == _NILVALUE:
      return None
    if sexptype == _REFSXP:
      index = flags >> 8 or self._int()
      return self.refs[index - 1]
    if sexptype in _SPECIAL:
      return None
    if sexptype == _SYMSXP:
      name = self.read()
      self.refs.append(name)
      return name
    if sexptype in (_LISTSXP, _LANGSXP):  # pairlist: [(tag, value), ...]
      if has_attr:
        self.read()
      tag = self.read() if has_tag else None
      head = [(tag, self.read())]
      tail = self.read()
      return head + (tail if isinstance(tail, list) else [])
    if sexptype == _CHARSXP:
      n = self._int()
      if n == -1:
        return None  # NA_character_
      raw = self.data[self.pos:self.pos + n]
      self.pos += n
      return raw.decode("latin-1" if (flags >> 12) & _LATIN1_MASK else "utf-8")
    if sexptype in (_LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP, _EXPRSXP):
      n = self._int()
      if n == -1:  # long vector: two more ints
        n = (self._int() << 32) + self._int()
      if sexptype in (_STRSXP, _VECSXP, _EXPRSXP):
        values = [self.read() for _ in range(n)]
      else:
        fmt = "d" if sexptype == _REALSXP else "i"
        values = list(struct.unpack_from(f">{n}{fmt}", self.data, self.pos))
        self.pos += struct.calcsize(f">{n}{fmt}")
      attributes = self._attributes(self.read()) if has_attr else None
      return RVector(values, sexptype, attributes)
    raise ValueError(f"unsupported R object type {sexptype} at byte {self.pos - 4}")


def unserialize_r(data: bytes) -> Any:
  """The object in R's XDR serialization ``data``: vectors become ``RVector`` (character
  vectors hold ``str``/``None`` for NA), pairlists ``[(tag, value), ...]``, symbols ``str``."""
  return _RUnserializer(data).read()


def read_r_lazyload_db(directory: str, basename: str = "Rdata") -> dict[str, Any]:
  """All objects of the R lazy-load data base ``directory/basename.{rdx,rdb}``, by name."""
  with open(os.path.join(directory, basename + ".rdx"), "rb") as f:
    index = unserialize_r(gzip.decompress(f.read()))
  fields = dict(zip(index.attributes["names"], index))
  if list(fields["compressed"]) not in ([1], [True]):
    raise ValueError(f"unsupported R lazy-load compression {list(fields['compressed'])}")
  variables = fields["variables"]
  with open(os.path.join(directory, basename + ".rdb"), "rb") as f:
    blob = f.read()
  out = {}
  for name, (offset, length) in zip(variables.attributes["names"], variables):
    chunk = blob[offset:offset + length]
    (size,) = struct.unpack(">I", chunk[:4])
    data = zlib.decompress(chunk[4:])
    if len(data) != size:
      raise ValueError(f"{name}: decompressed {len(data)} bytes, header says {size}")
    out[name] = unserialize_r(data)
  return out


# ------------------------------------------------------------------------------------------
# The novels
# ------------------------------------------------------------------------------------------


def source_bytes(novels: dict[str, list[str]]) -> bytes:
  """The decoded novels as one byte string, the content ``SHA256`` pins: for each name in
  ``NOVELS`` order, ``name + "\\n" + "\\n".join(lines) + "\\n"``, UTF-8."""
  return "".join(name + "\n" + "\n".join(novels[name]) + "\n" for name in NOVELS).encode("utf-8")


def read_novels(source_dir: str | None = None, verify: bool = True) -> dict[str, list[str]]:
  """Each novel's lines (NA lines as ``""``), read from the installed ``janeaustenr`` data."""
  source_dir = SOURCE_DIR if source_dir is None else source_dir
  require_files(source_dir, FILES, "Jane Austen novels (janeaustenr R data)", INSTALL)
  objects = read_r_lazyload_db(source_dir)
  missing = [n for n in NOVELS if n not in objects]
  if missing:
    raise ValueError(f"janeaustenr data lacks {missing}; found {sorted(objects)}")
  novels = {n: ["" if line is None else line for line in objects[n]] for n in NOVELS}
  if verify:
    check_sha256(source_bytes(novels), SHA256, f"janeaustenr data in {source_dir}", INSTALL)
  return novels


_CHAPTER = re.compile(r"^\s*chapter\s+([ivxlc]+|\d+)\.?\s*$", re.IGNORECASE)
_VOLUME = re.compile(r"^\s*volume\s+([ivxlc]+|\d+)\.?\s*$", re.IGNORECASE)
_END = re.compile(r"^\s*(the end|finis)\s*$", re.IGNORECASE)
_EDITORIAL = re.compile(r"^\[(at this point in the first|end volume)", re.IGNORECASE)
_BACK_MATTER = "A NOTE ON THE TEXT"


def _paragraphs(lines: list[str]) -> list[str]:
  """Blank-line separated paragraphs of ``lines``, unwrapped, cleaned, editorial notes dropped."""
  paragraphs, current = [], []
  for line in lines + [""]:
    if line.strip():
      current.append(line.strip())
    elif current:
      text = re.sub(r"\s+", " ", " ".join(current).replace("_", "")).strip()
      if text and not _EDITORIAL.match(text) and not _END.match(text):
        paragraphs.append(text)
      current = []
  return paragraphs


def clean_novel(lines: list[str]) -> list[str]:
  """The chapters of one novel's lines as cleaned texts (see the module docstring)."""
  chapters: list[list[str]] = []
  for line in lines:
    if line.strip() == _BACK_MATTER:
      break
    if _CHAPTER.match(line):
      chapters.append([])
    elif chapters and not _VOLUME.match(line):
      chapters[-1].append(line)
  texts = ["\n\n".join(_paragraphs(ch)) for ch in chapters]
  return [t for t in texts if t]


def documents(source_dir: str | None = None, verify: bool = True) -> list[tuple[str, str]]:
  """All ``(id, text)`` chapter documents, in record order."""
  novels = read_novels(source_dir, verify=verify)
  docs = []
  for name in NOVELS:
    for i, text in enumerate(clean_novel(novels[name]), start=1):
      docs.append((f"{name}/{i:03d}", text))
  return docs


def split_of(doc_id: str) -> str:
  """The split of document ``doc_id``: ``sha256(id) mod 100`` against ``SPLIT_BUCKETS``."""
  bucket = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") % 100
  for split, (lo, hi) in SPLIT_BUCKETS.items():
    if lo <= bucket < hi:
      return split
  raise AssertionError(bucket)


class DecodaxTextCorpus(LocalSourceBuilder):
  """Jane Austen's six novels, one cleaned chapter per record, split by a hash of its id."""

  name = "decodax_text_corpus"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Chapters of Debian r-cran-janeaustenr 1.0.0's six novels."}

  @classmethod
  def default_source_dir(cls) -> str:
    return SOURCE_DIR

  def check_source(self) -> None:
    require_files(self.source_dir, FILES, "Jane Austen novels (janeaustenr R data)", INSTALL)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Jane Austen's six completed novels (public domain, via the janeaustenr "
                    "package), one cleaned chapter per record; splits by sha256 of the id.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "text": tfds.features.Text(),
        }),
        homepage="https://github.com/juliasilge/janeaustenr",
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    self.check_source()
    docs = documents(self.source_dir)
    return {split: self._generate_examples(docs, split) for split in SPLIT_BUCKETS}

  def _generate_examples(self, docs: list[tuple[str, str]], split: str):
    for doc_id, text in docs:
      if split_of(doc_id) == split:
        yield doc_id, {"id": doc_id, "text": text}
