"""No script of ours is named like a module that a library imports: `python bench/X.py` puts
bench/ first on sys.path (and `python train.py` the root), so a bench/kernels.py was imported
by transformers in place of Hugging Face's optional `kernels` package, and every transformers
model failed to build."""

import importlib.machinery
import importlib.util
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT_DIRS = ("", "bench", "experiments")


def _script_names() -> dict[str, str]:
    names = {}
    for folder in SCRIPT_DIRS:
        directory = os.path.join(ROOT, folder)
        for entry in sorted(os.listdir(directory)):
            path = os.path.join(directory, entry)
            if entry.endswith(".py") and entry != "__init__.py":
                names[entry[:-3]] = os.path.join(folder, entry)
            elif folder and os.path.isdir(path) and not entry.startswith((".", "_")):
                names[entry] = os.path.join(folder, entry)
    return names


def _transformers_optional_packages() -> set[str]:
    # transformers decides which integrations to load by looking for these names on sys.path.
    spec = importlib.util.find_spec("transformers.utils.import_utils")
    source = open(spec.origin).read()
    return set(re.findall(r'_is_package_available\(\s*"([\w.]+)"', source))


def test_the_probe_finds_transformers_optional_packages():
    assert {"kernels", "accelerate"} <= _transformers_optional_packages()


@pytest.mark.parametrize("name,path", sorted(_script_names().items()))
def test_script_shadows_no_module(name, path):
    assert name not in _transformers_optional_packages(), (
        f"{path} is named like the optional package {name!r} that transformers imports"
    )
    outside = [p for p in sys.path if os.path.abspath(p or ".") not in _our_dirs()]
    spec = importlib.machinery.PathFinder.find_spec(name, outside)
    assert spec is None, f"{path} is named like the installed module {name!r} ({spec.origin})"


def _our_dirs() -> set[str]:
    return {os.path.join(ROOT, folder).rstrip("/") for folder in SCRIPT_DIRS} | {ROOT}
