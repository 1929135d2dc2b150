"""Run Triton kernels (FLA's RWKV-6 and RWKV-7 ops, our own) on the CPU through Triton's interpreter.

Loaded from tests/conftest.py as a pytest plugin. Without a GPU it sets TRITON_INTERPRET=1 before anything
imports triton, and the `triton_interpreter` fixture mends the three gaps of the interpreter that FLA's kernels
hit (docs/triton-interpreter.md). The mends touch private triton internals, so they are applied only for the
pinned versions below; any other version skips the tests that ask for the fixture, with the reason. With a GPU,
the fixture changes nothing and the kernels run compiled.

Usage: a test takes `triton_interpreter` and then imports the op, e.g. `from fla.ops.rwkv6 import chunk_rwkv6`.
"""
import ast
import importlib
import inspect
import os
import sys
from importlib.metadata import PackageNotFoundError, version

import pytest
import torch

PINNED = {"triton": "3.7.1", "fla-core": "0.6.0"}
INTERPRETING = not torch.cuda.is_available()

if INTERPRETING:  # must precede the first `import triton`, which reads it once
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("FLA_USE_COMPILE", "0")  # else FLA's helpers spend ~40 s in torch.compile on a CPU


def installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def version_mismatch() -> str | None:
    """Why the pinned interpreter mends cannot be used here, or None."""
    found = {name: installed(name) for name in PINNED}
    wrong = [f"{name} {found[name] or 'missing'}" for name in PINNED if found[name] != PINNED[name]]
    if not wrong:
        return None
    pins = ", ".join(f"{name}=={pin}" for name, pin in PINNED.items())
    return f"the Triton interpreter mends are written for {pins}; found {', '.join(wrong)}"


@pytest.fixture(scope="session")
def triton_interpreter():
    """FLA's Triton ops usable in this process: compiled on a GPU, interpreted (and mended) on the CPU."""
    if not INTERPRETING:
        if installed("fla-core") is None:
            pytest.skip("needs fla-core on this GPU machine")
        yield
        return
    mismatch = version_mismatch()
    if mismatch:
        pytest.skip(mismatch)
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 was overridden in the environment")
    with pytest.MonkeyPatch.context() as patch:
        mend_autotune(patch)
        mend_loop_variables(patch)
        importlib.import_module("fla.ops")  # loads every op module (rwkv6, rwkv7, ...) so their aliases are seen
        mend_builtin_aliases(patch)
        yield


def mend_autotune(patch: pytest.MonkeyPatch):
    """Gap 1: the autotuner times configs through a GPU driver. Report equal times: the first config is used."""
    from triton.runtime.autotuner import Autotuner
    patch.setattr(Autotuner, "_bench", lambda self, *args, config, **meta: [1.0, 1.0, 1.0])


def mend_loop_variables(patch: pytest.MonkeyPatch):
    """Gap 2: `for i in range(n)` gives a Python int, so `i.to(tl.int64)` fails. Make it a Triton scalar, as
    compiled Triton does (static_range stays a Python int: it is a compile-time constant there too)."""
    from triton.runtime import interpreter

    class LoopVariablesAsTensors(interpreter.ASTTransformer):
        def visit_For(self, node):
            node = self.generic_visit(node)
            if isinstance(node.target, ast.Name) and is_dynamic_range(node.iter):
                name = node.target.id
                as_tensor = ast.Call(
                    func=ast.Attribute(value=ast.Name(id="interpreter_semantic", ctx=ast.Load()), attr="to_tensor",
                                       ctx=ast.Load()),
                    args=[ast.Name(id=name, ctx=ast.Load()), ast.Constant(value=False)], keywords=[])
                node.body.insert(0, ast.Assign(targets=[ast.Name(id=name, ctx=ast.Store())], value=as_tensor))
            return node

    patch.setattr(interpreter.FunctionRewriter, "ast_transformer", LoopVariablesAsTensors())
    patch.setattr(interpreter.InterpretedFunction, "rewritten_fn", {})  # forget kernels rewritten without the mend


def is_dynamic_range(iterator: ast.expr) -> bool:
    """`range(...)` or `tl.range(...)`."""
    if not isinstance(iterator, ast.Call):
        return False
    func = iterator.func
    return (isinstance(func, ast.Name) and func.id == "range") or (isinstance(func, ast.Attribute)
                                                                  and func.attr == "range")


def mend_builtin_aliases(patch: pytest.MonkeyPatch):
    """Gap 3: the interpreter re-points builtins on `triton.language` only, so a module-level alias such as
    `gather = tl.gather` still wants a compiler. Re-point such aliases in fla's modules to the interpreter."""
    from triton.language.core import is_builtin
    from triton.runtime.interpreter import interpreter_semantic

    def interpreted(builtin):
        def call(*args, **kwargs):
            kwargs.pop("_semantic", None)
            return builtin(*args, _semantic=interpreter_semantic, **kwargs)
        return call

    for name, module in list(sys.modules.items()):
        if module is None or not (name == "fla" or name.startswith("fla.")):
            continue
        for attr, value in inspect.getmembers(module):
            if is_builtin(value):
                patch.setattr(module, attr, interpreted(value))
