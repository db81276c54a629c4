"""Reader for CTranslate2's `model.bin`: a flat, little-endian file of named arrays.

Layout (binary versions 2 to 6, as written by CTranslate2's Python converters):

  uint32 binary_version; string spec_name; uint32 spec_revision
  uint32 n; n x variable: string name, uint8 rank, uint32 dims[rank],
                           uint8 dtype, uint32 num_bytes, bytes
  uint32 n_aliases; n_aliases x (string alias, string target)     (version >= 3)

where a string is a uint16 byte count followed by the bytes (NUL-terminated). Scalars (rank
0) carry the model's options (activation, number of heads, ...). Only the versions whose
variables record their dtype (>= 4) are read; older files are refused by name.
"""
from __future__ import annotations

import dataclasses
import struct

import numpy as np

# CTranslate2's DataType enum, in its order.
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
SUPPORTED_VERSIONS = range(4, 7)


class FormatError(ValueError):
  """The file is not a CTranslate2 model.bin this reader understands."""


@dataclasses.dataclass(frozen=True)
class ModelFile:
  spec: str  # e.g. "WhisperSpec"
  revision: int
  variables: dict  # name -> np.ndarray (scalars as 0-d arrays); aliases resolved

  def array(self, name: str) -> np.ndarray:
    if name not in self.variables:
      raise FormatError(f"{self.spec} file has no variable {name!r}")
    return self.variables[name]

  def scalar(self, name: str) -> int:
    return int(self.array(name))


class _Cursor:
  def __init__(self, buf: memoryview, path: str):
    self.buf, self.pos, self.path = buf, 0, path

  def take(self, fmt: str):
    size = struct.calcsize("<" + fmt)
    if self.pos + size > len(self.buf):
      raise FormatError(f"{self.path} ends early (truncated?) at byte {self.pos}")
    out = struct.unpack_from("<" + fmt, self.buf, self.pos)
    self.pos += size
    return out if len(out) > 1 else out[0]

  def string(self) -> str:
    n = self.take("H")
    raw = bytes(self.buf[self.pos: self.pos + n])
    if len(raw) != n:
      raise FormatError(f"{self.path} ends early (truncated?) at byte {self.pos}")
    self.pos += n
    return raw.split(b"\0", 1)[0].decode("utf-8")

  def bytes(self, n: int) -> memoryview:
    if self.pos + n > len(self.buf):
      raise FormatError(f"{self.path} ends early (truncated?) at byte {self.pos}")
    out = self.buf[self.pos: self.pos + n]
    self.pos += n
    return out


def read(path: str) -> ModelFile:
  """Reads every variable of `path` into numpy arrays (copies: the file is closed after)."""
  with open(path, "rb") as f:
    data = f.read()
  cur = _Cursor(memoryview(data), path)
  version = cur.take("I")
  if version not in SUPPORTED_VERSIONS:
    raise FormatError(f"{path}: CTranslate2 binary version {version} is not supported "
                      f"(this reader handles {SUPPORTED_VERSIONS.start}-"
                      f"{SUPPORTED_VERSIONS.stop - 1}); is it a model.bin?")
  spec = cur.string()
  revision = cur.take("I")
  variables = {}
  for _ in range(cur.take("I")):
    name = cur.string()
    rank = cur.take("B")
    shape = tuple(int(d) for d in (cur.take("I" * rank) if rank > 1 else
                                   ((cur.take("I"),) if rank == 1 else ())))
    type_id = cur.take("B")
    if type_id not in DTYPES:
      raise FormatError(f"{path}: variable {name!r} has dtype id {type_id}, which this "
                        f"reader does not handle ({sorted(DTYPES)})")
    nbytes = cur.take("I")
    dtype = np.dtype(DTYPES[type_id])
    if nbytes != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise FormatError(f"{path}: variable {name!r} of shape {shape} has {nbytes} bytes")
    variables[name] = np.frombuffer(cur.bytes(nbytes), dtype).reshape(shape).copy()
  for _ in range(cur.take("I")):
    alias, target = cur.string(), cur.string()
    if target not in variables:
      raise FormatError(f"{path}: alias {alias!r} names a missing variable {target!r}")
    variables[alias] = variables[target]
  if cur.pos != len(data):
    raise FormatError(f"{path}: {len(data) - cur.pos} unread bytes after the aliases")
  return ModelFile(spec=spec, revision=revision, variables=variables)
