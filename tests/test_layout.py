"""The package's layers, as ARCHITECTURE.md draws them: who may import whom, no import cycle between modules or
between folders, how long a module may be, that the repository root does not shadow Hugging Face's `kernels`,
and that no file points outside the repository."""
import ast
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "rwkvray"
MAX_LINES = 400


def ours(*parts: str) -> tuple[str, ...]:
    return tuple(f"rwkvray.{part}" for part in parts)


# Folder (or top-level module) of rwkvray/ → what its code may not import, as module prefixes. ARCHITECTURE.md's
# table says the same from the other side (what each folder may import); keep the two together.
FORBIDDEN = {
    "errors": ours("files", "spec", "kernels", "model", "text", "engine", "peft", "train", "eval", "launch", "serve",
                   "compat", "cli"),
    "files": ours("spec", "kernels", "model", "text", "engine", "peft", "train", "eval", "launch", "serve", "compat",
                  "cli"),
    "spec": ours("kernels", "model", "text", "engine", "peft", "train", "eval", "launch", "serve", "compat", "cli")
    + ("ray", "deepspeed", "torch.cuda"),
    "kernels": ours("files", "spec", "model", "text", "engine", "peft", "train", "eval", "launch", "serve", "compat",
                    "cli"),
    "model": ours("text", "engine", "peft", "train", "eval", "launch", "serve", "compat", "cli"),
    "text": ours("engine", "peft", "train", "eval", "launch", "serve", "compat", "cli"),
    "engine": ours("peft", "train", "eval", "launch", "serve", "compat", "cli"),  # the one batch engine
    "peft": ours("engine", "train", "eval", "launch", "serve", "compat", "cli"),
    "train": ours("engine", "eval", "launch", "serve", "compat", "cli"),
    # testing states: scored on the serving engine; `rwkvray eval`'s Ray driver is launch/evaluate.py
    "eval": ours("peft", "launch", "serve", "compat", "cli"),
    "launch": ours("compat", "cli"),
    "serve": ours("train", "launch", "compat", "cli"),
    "compat": ours("kernels", "model", "text", "engine", "peft", "train", "eval", "launch", "serve", "cli"),
    "cli": (),  # the command line: the one place that puts the layers together
}
# Narrow exceptions to the table, each with its reason.
ALLOWED = {
    "eval": ("rwkvray.train.data",),  # chat rows are masked exactly as loss_mask qa trains
}


def layer(path: pathlib.Path) -> str:
    """rwkvray/model/rwkv7.py → "model"; rwkvray/cli.py → "cli"."""
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def dotted_package(path: pathlib.Path) -> str:
    """rwkvray/model/rwkv7.py and rwkvray/model/__init__.py → "rwkvray.model"."""
    return ".".join(path.relative_to(REPO).parts[:-1])


def imported_names(source: str, package: str) -> set[str]:
    """Every module that code in `package` imports, anywhere (functions included), as absolute dotted names;
    `from a import b` gives "a" and "a.b", and an attribute used on an imported module (`torch.cuda.is_available()`)
    gives "torch.cuda"."""
    tree = ast.parse(source)
    names, aliases = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names.add(alias.name)
                root = alias.name.split(".")[0]  # `import a.b` binds `a`
                aliases[alias.asname or root] = alias.name if alias.asname else root
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            for alias in node.names:
                names.add(f"{base}.{alias.name}")
                aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            names.add(f"{aliases[node.value.id]}.{node.attr}")
    return names


def matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def forbidden_imports(path: pathlib.Path) -> list[str]:
    """The imports of one file that its layer may not make; `from a import b` is named once, as "a"."""
    where = layer(path)
    bad = [name for name in imported_names(path.read_text(), dotted_package(path))
           if any(matches(name, p) for p in FORBIDDEN.get(where, ()))
           and not any(matches(name, p) for p in ALLOWED.get(where, ()))]
    return sorted(name for name in bad if not any(other != name and matches(name, other) for other in bad))


def test_each_layer_imports_only_what_is_below_it():
    problems = [f"{path.relative_to(REPO)} imports {name}"
                for path in sorted(PACKAGE.rglob("*.py")) for name in forbidden_imports(path)]
    assert not problems, "imports against the layering in ARCHITECTURE.md:\n" + "\n".join(problems)


def module_name(path: pathlib.Path) -> str:
    """rwkvray/model/rwkv.py → "rwkvray.model.rwkv"; rwkvray/model/__init__.py → "rwkvray.model"."""
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Module → the modules of ours it imports, anywhere in it. A name resolves to the longest module it starts
    with (`from rwkvray.peft import build_peft` → "rwkvray.peft"). A module importing its own package is left
    out: the package's __init__ re-exports it, which Python resolves without a cycle."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        graph[module] = set()
        for name in imported_names(path.read_text(), dotted_package(path)):
            while name and name not in paths:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                graph[module].add(name)
    return graph


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same edges between folders (and top-level modules): rwkvray.model.rwkv → "model"."""
    folder = lambda module: module.split(".")[1] if "." in module else "__init__"
    folders: dict[str, set[str]] = {}
    for module, targets in graph.items():
        folders.setdefault(folder(module), set()).update(folder(t) for t in targets if folder(t) != folder(module))
    return folders


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of nodes that reach each other (each a cycle or several), sorted."""
    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen
    reachable = {node: reach(node) for node in graph}
    groups = {tuple(sorted(other for other in graph if other in reachable[node] and node in reachable[other]))
              for node in graph if node in reachable[node]}
    return sorted(list(group) for group in groups)


def test_no_import_cycle_between_modules_or_folders():
    graph = import_graph()
    found = [f"modules: {' <-> '.join(group)}" for group in cycles(graph)]
    found += [f"folders: {' <-> '.join(group)}" for group in cycles(folder_graph(graph))]
    assert not found, "import cycles (imports inside functions count):\n" + "\n".join(found)


def test_the_cycle_search_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"], ["e"]]
    assert folder_graph({"rwkvray.launch.x": {"rwkvray.serve.y"}, "rwkvray.serve.y": {"rwkvray.launch.z"},
                         "rwkvray.launch.z": set()}) == {"launch": {"serve"}, "serve": {"launch"}}


def test_every_folder_has_a_row_here_and_in_architecture_md():
    layers = {layer(path) for path in PACKAGE.rglob("*.py")} - {"__init__"}
    assert layers == set(FORBIDDEN)
    architecture = (REPO / "ARCHITECTURE.md").read_text()
    missing = [name for name in sorted(layers) if f"`rwkvray/{name}" not in architecture]
    assert not missing, f"ARCHITECTURE.md has no row for {missing}"


def test_the_import_scan_sees_every_form_of_import():
    source = ("import torch\nfrom . import dims\nfrom ..peft.base import PeftModel\n"
              "def late():\n    from rwkvray.train import loop\n    return torch.cuda.is_available()\n")
    assert imported_names(source, "rwkvray.model") == {
        "torch", "torch.cuda", "rwkvray.model", "rwkvray.model.dims", "rwkvray.peft.base",
        "rwkvray.peft.base.PeftModel", "rwkvray.train", "rwkvray.train.loop"}


def test_every_module_is_at_most_400_lines():
    long = {str(p.relative_to(REPO)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: " + ", ".join(f"{p} ({n})" for p, n in long.items())


def kernels_found_in_project_source(root: pathlib.Path) -> list[str]:
    """The files and folders that `import kernels`, run from `root`, loads from `root`'s own source: anything under
    `root` except installed packages (a virtualenv inside the repository, as the README makes, holds Hugging Face's
    `kernels`, which `transformers` installs)."""
    probe = ("import site, sysconfig\n"
             "print('installed:' + sysconfig.get_paths()['purelib'])\n"
             "print('installed:' + sysconfig.get_paths()['platlib'])\n"
             "for d in site.getsitepackages(): print('installed:' + d)\n"
             "try:\n    import kernels\nexcept ModuleNotFoundError:\n    pass\nelse:\n"
             "    print(getattr(kernels, '__file__', None) or '')\n"
             "    print('\\n'.join(getattr(kernels, '__path__', [])))\n")
    found = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True)
    lines = found.stdout.splitlines()
    installed = [pathlib.Path(line.removeprefix("installed:")).resolve() for line in lines
                 if line.startswith("installed:")]
    loaded = [pathlib.Path(line).resolve() for line in lines if line and not line.startswith("installed:")]
    return [str(path) for path in loaded
            if path.is_relative_to(root) and not any(path.is_relative_to(site) for site in installed)]


def test_import_kernels_from_the_repository_root_does_not_find_this_project():
    inside = kernels_found_in_project_source(REPO)
    assert not inside, f"`import kernels` from {REPO} loads this repository's {inside}"


def test_the_kernels_probe_catches_a_top_level_kernels_folder(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    assert kernels_found_in_project_source(tmp_path.resolve()) == [str(tmp_path.resolve() / "kernels" / "__init__.py"),
                                                                   str(tmp_path.resolve() / "kernels")]


def test_installs_use_the_constraints_file_and_it_pins_what_the_tests_passed_with():
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    installs = [line for text in (readme, ci) for line in text.splitlines()
                if line.startswith("python3 -m venv .venv") and "pip install" in line]  # the commands to run
    assert len(installs) == 3 and all("pip install -q -c constraints.txt " in line
                                      or "pip install -c constraints.txt " in line for line in installs), installs
    pins = [line for line in (REPO / "constraints.txt").read_text().splitlines() if not line.startswith("#")]
    assert "torch==2.13.0" in pins and all("==" in line for line in pins), pins
    assert not [line for line in pins if line.startswith(("rwkvray", "-e")) or "+" in line or " @ " in line]
