"""The docstring examples of every library module run, and every public class has one."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

PACKAGES = ("epochwise.callbacks", "epochwise.datamodules", "epochwise.modules")


def library_modules() -> list[str]:
    names = []
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        names.append(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            names.append(f"{package_name}.{info.name}")
    return sorted(names)


@pytest.mark.parametrize("name", library_modules())
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"


def public_classes() -> list[tuple[str, type]]:
    out = []
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        for name in getattr(package, "__all__", []):
            obj = getattr(package, name)
            if inspect.isclass(obj) and obj.__module__.startswith("epochwise."):
                out.append((f"{package_name}.{name}", obj))
    return out


@pytest.mark.parametrize("name, cls", public_classes(), ids=[n for n, _ in public_classes()])
def test_every_public_class_shows_its_use(name, cls):
    assert ">>>" in (cls.__doc__ or ""), f"{name} has no usage example in its docstring"
