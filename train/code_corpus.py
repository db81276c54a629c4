"""Real Python functions with known bodies, cut from the standard-library sources Debian installs.

A code model's behaviour on its own task is measured by giving it a function's signature and
docstring and looking at how it continues (HumanEval's format, "Evaluating Large Language
Models Trained on Code", Chen et al. 2021). Teacher forcing needs such pairs with a known
continuation; here they come from the Python standard library as Debian's packages install
it (`/usr/lib/python3.X/*.py`, packages `libpython3.X-minimal` and `libpython3.X-stdlib`, the
latter pulled in by `libpython3-stdlib`): plenty of real, documented code that is disjoint
from the HumanEval problems a method is evaluated on.

`extract_functions(source)` parses a module with `ast` and returns, for every function
defined at module level or in a (nested) class body (functions nested in functions stay part
of their parent's body), a `FunctionExample`:

* prompt: the decorators, the signature and, when present, the docstring, up to the end of
  the docstring's line (with no docstring: up to the line before the first statement);
* continuation: the rest of the body, from the next line to the function's last line.

Methods are dedented by their `def`'s column, so every prompt starts at column 0 (lines of a
multi-line string that start further left are left as they are). Functions whose body starts
on the `def` line (or on the docstring's last line) or has nothing after the docstring are
skipped.
"""
from __future__ import annotations

import ast
import dataclasses
import glob
import os
import re
from typing import Iterator, Optional, Sequence

#: where Debian's python3.X packages put the standard library
DEBIAN_LIB = "/usr/lib"
INSTALL_HINT = ("install Debian's Python standard library (apt-get install -y "
                "--no-install-recommends libpython3-stdlib) or pass --source_dir")


class SourceError(ValueError):
  """The source directory is missing or holds no usable Python files."""


@dataclasses.dataclass(frozen=True)
class FunctionExample:
  """One function: what the model is given (`prompt`) and its known body (`continuation`)."""
  file: str  # the source file's name (no directory)
  name: str  # qualified name, e.g. "Class.method"
  lineno: int  # the function's first line (its first decorator's) in the file
  prompt: str
  continuation: str


def _version_key(path: str) -> tuple[int, ...]:
  return tuple(int(x) for x in re.findall(r"\d+", os.path.basename(path)))


def find_stdlib_dir(root: Optional[str] = None) -> str:
  """The newest `root/python3.X` folder (root: DEBIAN_LIB) holding the standard library's
  sources (`ast.py` and `typing.py` at least); SourceError naming the package to install
  when there is none."""
  root = DEBIAN_LIB if root is None else root
  found = [d for d in glob.glob(os.path.join(root, "python3.*"))
           if re.fullmatch(r"python3\.\d+", os.path.basename(d))
           and all(os.path.isfile(os.path.join(d, f)) for f in ("ast.py", "typing.py"))]
  if not found:
    raise SourceError(f"no Python standard-library sources under {root}/python3.* : "
                      f"{INSTALL_HINT}")
  return max(found, key=_version_key)


def source_files(source_dir: str) -> list[str]:
  """The `*.py` files directly in `source_dir` (no subpackages), sorted by name."""
  if not os.path.isdir(source_dir):
    raise SourceError(f"source directory {source_dir!r} does not exist: {INSTALL_HINT}")
  files = sorted(glob.glob(os.path.join(source_dir, "*.py")))
  if not files:
    raise SourceError(f"no *.py files in {source_dir!r}: {INSTALL_HINT}")
  return files


def _functions(body: Sequence[ast.stmt], prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
  """(qualified name, node) of the functions in a module or class body, classes recursed."""
  for node in body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield prefix + node.name, node
    elif isinstance(node, ast.ClassDef):
      yield from _functions(node.body, prefix + node.name + ".")


def _dedent(lines: Sequence[str], column: int) -> str:
  """Drops `column` leading characters from each line that starts with that much blank."""
  return "".join(l[column:] if l[:column].strip() == "" and len(l) > column else
                 ("\n" if l.strip() == "" else l) for l in lines)


def _docstring_node(node: ast.AST) -> Optional[ast.Expr]:
  first = node.body[0]
  if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
      and isinstance(first.value.value, str)):
    return first
  return None


def extract_functions(source: str, file: str = "<string>", require_docstring: bool = True
                      ) -> list[FunctionExample]:
  """The prompt/continuation pairs of the functions in `source` (module docstring), in file
  order; `require_docstring` keeps only documented functions. SyntaxError propagates."""
  tree = ast.parse(source)
  lines = source.splitlines(keepends=True)
  out = []
  for name, node in _functions(tree.body):
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    column = min([node.col_offset] + [d.col_offset - 1 for d in node.decorator_list])
    doc = _docstring_node(node)
    if doc is None and require_docstring:
      continue
    rest = node.body[1:] if doc is not None else node.body
    if not rest:
      continue
    header_end = doc.end_lineno if doc is not None else rest[0].lineno - 1
    if header_end < node.lineno or rest[0].lineno <= header_end:
      continue  # the body shares a line with the signature or the docstring
    prompt = _dedent(lines[start - 1:header_end], column)
    continuation = _dedent(lines[header_end:node.end_lineno], column)
    if not continuation.strip():
      continue
    out.append(FunctionExample(file=os.path.basename(file), name=name, lineno=start,
                               prompt=prompt, continuation=continuation))
  return out


def collect_functions(source_dir: str, require_docstring: bool = True
                      ) -> tuple[list[FunctionExample], list[str]]:
  """Every function of every `*.py` file in `source_dir` (file order, then line order), and
  the files that did not parse with this interpreter's grammar (skipped)."""
  examples, skipped = [], []
  for path in source_files(source_dir):
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
      examples += extract_functions(text, path, require_docstring)
    except (SyntaxError, UnicodeDecodeError, ValueError):
      skipped.append(os.path.basename(path))
  return examples, skipped
