"""Every error regrad-hf raises is a ReGradError (the developers' rule): checked over the source, statement by
statement, so that a new `raise ValueError(...)` fails here rather than in a user's `except ReGradError`."""

import ast
import builtins
import inspect
from pathlib import Path

import regrad_hf
from regrad_hf import errors

SOURCES = sorted((Path(regrad_hf.__file__).parent).rglob("*.py"))
BUILTIN_ERRORS = {
    name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)
}
# Raised on purpose: the protocol of `__getattr__`, and argparse's exit through SystemExit in the CLI.
ALLOWED = {"AttributeError", "SystemExit", "KeyboardInterrupt", "NotImplementedError"}


def raised_names(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(target, ast.Name):
                found.append((node.lineno, target.id))
    return found


def test_the_library_raises_only_its_own_errors():
    ours = {
        name for name, value in vars(errors).items() if inspect.isclass(value) and issubclass(value, errors.ReGradError)
    }
    plain = [
        f"{path.name}:{line} raises {name}"
        for path in SOURCES
        for line, name in raised_names(path)
        if name in BUILTIN_ERRORS and name not in ALLOWED and name not in ours
    ]
    assert not plain, plain


def test_every_error_class_is_exported_and_a_regrad_error():
    classes = [value for value in vars(errors).values() if inspect.isclass(value) and issubclass(value, Exception)]
    assert all(issubclass(value, errors.ReGradError) for value in classes)
    assert {value.__name__ for value in classes} <= set(regrad_hf.__all__)
