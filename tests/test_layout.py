"""The shape of the package itself: modules import one way, keep to their own objects, and
`import minillama` stays light. Checked by reading the source with `ast`, nothing is run."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minillama"


def modules():
    """{dotted name: parsed source} for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (ast.parse(path.read_text(encoding="utf-8")), path.name == "__init__.py")
    return found


def imports(name, tree, is_package, known):
    """Modules of the package that `name` imports anywhere, inside functions too: a deferred
    import closes a cycle just as well, it only hides it until run time."""
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` names a module; `from mod import name` names the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:      # import a.b.c of a module a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


def import_graph():
    known = modules()
    return {name: set(imports(name, tree, pkg, known)) for name, (tree, pkg) in known.items()}


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "minillama.model" in graph and graph["minillama.model"], "the import scan found nothing"
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    # the check above must be able to fail
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def foreign_attribute_writes(tree):
    """`obj.attr = value` where obj is not self/cls, nor a local bound to a call of a class
    defined in this same module, and attr is not one that a class of this module
    declares (as self.attr): a write into another module's object. Module attributes written
    through an imported module (torch.backends.cudnn.allow_tf32 = ...) are that library's
    configuration API, not an object of its classes."""
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    own = {c.name for c in classes}
    declared = {t.attr for c in classes for t in ast.walk(c)            # self.attr = ...
                if isinstance(t, ast.Attribute) and isinstance(t.ctx, ast.Store)
                and isinstance(t.value, ast.Name) and t.value.id == "self"}
    declared |= {t.target.id for c in classes for t in c.body           # dataclass fields
                 if isinstance(t, ast.AnnAssign) and isinstance(t.target, ast.Name)}
    imported = {(a.asname or a.name).split(".")[0] for n in ast.walk(tree)
                if isinstance(n, ast.Import) for a in n.names}
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        made_here = set()
        for node in ast.walk(func):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                    and isinstance(node.value.func, ast.Name) and node.value.func.id in own:
                made_here |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(func):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id == "setattr":
                yield node.lineno, ast.unparse(node)
            if not isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                continue
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                for t in ast.walk(target):
                    if isinstance(t, ast.Attribute) and isinstance(t.ctx, ast.Store):
                        base, root = t.value, t.value
                        while isinstance(root, ast.Attribute):
                            root = root.value
                        if isinstance(base, ast.Name) and (base.id in ("self", "cls")
                                                           or base.id in made_here):
                            continue
                        if t.attr in declared or (isinstance(root, ast.Name)
                                                  and root.id in imported):
                            continue
                        yield node.lineno, ast.unparse(t)


def test_no_module_writes_attributes_into_another_modules_objects():
    found = [f"{name}:{line}: {text}" for name, (tree, _) in modules().items()
             for line, text in foreign_attribute_writes(tree)]
    assert found == []


def test_the_attribute_check_can_fail():
    tree = ast.parse("def load(path):\n    tok = other.Tokenizer(path)\n    tok.chat = 1\n")
    assert [text for _, text in foreign_attribute_writes(tree)] == ["tok.chat"]


HEAVY = ("torch", "cupy", "gguf", "safetensors", "transformers")


@pytest.mark.parametrize("module", ["minillama", "minillama.cli", "minillama.loading",
                                    "minillama.generation", "minillama.run",
                                    "minillama.tokenizers"])
def test_importing_minillama_stays_light(module):
    code = (f"import sys, {module}\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"import {module} pulled in {r.stdout.strip()}"


def test_every_subpackage_is_installed():
    """`pip install .` installs only the packages setup.cfg lists: a subpackage missing there
    imports from a checkout and fails after a plain install (minillama.parallel once did)."""
    import configparser
    root = Path(__file__).resolve().parents[1]
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    on_disk = {"minillama"} | {f"minillama.{d.name}" for d in (root / "minillama").iterdir()
                               if (d / "__init__.py").is_file()}
    assert on_disk <= listed, f"not in setup.cfg's packages: {sorted(on_disk - listed)}"
