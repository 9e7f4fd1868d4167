"""The package's shape: no import cycle, the attention dependency rule, short modules.

Imports are read from the source (every `import` / `from ... import`, also those inside
functions), so a lazy import that closes a circle is caught too. Importing a submodule
runs its parent packages' `__init__`; those implicit edges are not counted (every package
that re-exports its submodules would otherwise be a circle).
"""

import ast
import pathlib
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "sparse_attn"
MAX_LINES = 450
MAX_TRAIN_LINES = 350


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(name: str, modules) -> str | None:
  """The module `name` refers to (itself, or the nearest package above it), if ours."""
  while name:
    if name in modules:
      return name
    name = name.rpartition(".")[0]
  return None


def import_graph(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  """{module: the sparse_attn modules it imports}, read from the source."""
  graph = {}
  for mod, path in modules.items():
    is_pkg = path.name == "__init__.py"
    here = mod if is_pkg else mod.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = here.split(".")
          anchor = anchor[:len(anchor) - (node.level - 1)]
          base = ".".join(anchor + ([base] if base else []))
        # `from pkg import name`: a submodule if one is called so, else pkg itself.
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                   for a in node.names]
      for t in targets:
        if t.split(".")[0] != "sparse_attn":
          continue
        r = _resolve(t, modules)
        if r is not None and r != mod:
          edges.add(r)
    graph[mod] = edges
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_cycle_finder_finds_a_cycle():
  g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert cycles(g) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
  pkg = tmp_path / "sparse_attn"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("def f():\n  from sparse_attn.sub import b\n")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "sub" / "b.py").write_text("from .. import a\n")
  monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
  graph = import_graph(_modules())
  assert graph["sparse_attn.a"] == {"sparse_attn.sub.b"}
  assert graph["sparse_attn.sub.b"] == {"sparse_attn.a"}
  assert cycles(graph) == [["sparse_attn.a", "sparse_attn.sub.b"]]


def test_no_import_cycle_in_the_package():
  assert cycles(import_graph(_modules())) == []


FORBIDDEN_FOR_KERNELS = ("sparse_attn.attention.seam", "sparse_attn.attention.policy",
                         "sparse_attn.attention", "sparse_attn.model")


def test_kernels_never_import_the_seam_the_policy_or_the_model():
  modules = _modules()
  kernels = [m for m in modules if m.startswith("sparse_attn.attention.kernels")]
  assert kernels, "no sparse_attn.attention.kernels package"
  graph = import_graph(modules)
  bad = {k: sorted(graph[k] & set(FORBIDDEN_FOR_KERNELS)) for k in kernels
         if graph[k] & set(FORBIDDEN_FOR_KERNELS)}
  assert bad == {}


# What `masks/` may use besides itself: the package root, errors and the asset cache.
MASKS_MAY_IMPORT = ("sparse_attn", "sparse_attn.errors", "sparse_attn.assets")


def test_masks_import_nothing_above_them():
  graph = import_graph(_modules())
  bad = {m: sorted(e for e in edges if not e.startswith("sparse_attn.masks")
                   and e not in MASKS_MAY_IMPORT)
         for m, edges in graph.items() if m.startswith("sparse_attn.masks")}
  assert {m: e for m, e in bad.items() if e} == {}


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(PKG)))
def test_modules_are_short(path):
  limit = MAX_TRAIN_LINES if path == PKG / "train.py" else MAX_LINES
  n = len(path.read_text(encoding="utf-8").splitlines())
  assert n <= limit, f"{path.relative_to(PKG.parent)} has {n} lines (at most {limit})"
