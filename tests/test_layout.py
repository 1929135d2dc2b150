"""The package's layers, as ARCHITECTURE.md draws them: who may import whom, how long a module may be, that the
repository root does not shadow Hugging Face's `kernels`, and that no file points outside the repository."""
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
    "errors": ours("files", "spec", "kernels", "model", "text", "peft", "train", "launch", "serve", "compat", "cli"),
    "files": ours("spec", "kernels", "model", "text", "peft", "train", "launch", "serve", "compat", "cli"),
    "spec": ours("kernels", "model", "text", "peft", "train", "launch", "serve", "compat", "cli")
    + ("ray", "deepspeed", "torch.cuda"),
    "kernels": ours("files", "spec", "model", "text", "peft", "train", "launch", "serve", "compat", "cli"),
    "model": ours("text", "peft", "train", "launch", "serve", "compat", "cli"),
    "text": ours("peft", "train", "launch", "serve", "compat", "cli"),
    "peft": ours("train", "launch", "serve", "compat", "cli"),
    "train": ours("launch", "serve", "compat", "cli"),
    "launch": ours("compat", "cli"),
    "serve": ours("train", "launch", "compat", "cli"),
    "compat": ours("kernels", "model", "text", "peft", "train", "launch", "serve", "cli"),
    "cli": (),  # the command line: the one place that puts the layers together
}
# Testing states (`rwkvray eval`, /v1/evals, the sweep's eval metric): scored on Serve's engine, so it sits beside
# serve; serve and launch may use it, nothing below them.
FORBIDDEN["eval"] = ours("peft", "train", "launch", "compat", "cli")
for lower in ("errors", "files", "spec", "kernels", "model", "text", "peft", "train", "compat"):
    FORBIDDEN[lower] += ours("eval")
# Narrow exceptions to the table, each with its reason.
ALLOWED = {
    "serve": ("rwkvray.launch.ray_session",),  # `rwkvray serve` joins or starts Ray the way `run` does
    "eval": ("rwkvray.launch.ray_session",  # `rwkvray eval` joins or starts Ray the way `run` does
             "rwkvray.train.data"),  # chat rows are masked exactly as loss_mask qa trains
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


def test_import_kernels_from_the_repository_root_does_not_find_this_project():
    probe = ("try:\n    import kernels\nexcept ModuleNotFoundError:\n    pass\nelse:\n"
             "    print(getattr(kernels, '__file__', None) or '')\n"
             "    print('\\n'.join(getattr(kernels, '__path__', [])))\n")
    found = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    inside = [line for line in found.stdout.splitlines()
              if line and pathlib.Path(line).resolve().is_relative_to(REPO)]
    assert not inside, f"`import kernels` from {REPO} loads this repository's {inside}"


def test_no_tracked_file_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split("\0")
    outside = "../" + "shared"  # spelled in two parts so this file does not match itself
    hits = []
    for name in filter(None, tracked):
        path = REPO / name
        if path.is_file() and outside in path.read_bytes().decode("utf-8", "replace"):
            hits.append(name)
    assert not hits, f"files that refer to {outside}: {', '.join(hits)}"
