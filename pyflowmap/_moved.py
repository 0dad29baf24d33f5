"""Import paths from before the package was split into core, ``training`` and the apps, kept
working: ``import pyflowmap.train`` gives a module holding the same objects as before (from
:mod:`pyflowmap.toy2d.train` and :mod:`pyflowmap.training`, so classes compare equal), with a
DeprecationWarning naming the new paths. Names that moved between modules that still exist
are forwarded by those modules' ``__getattr__`` (:func:`forward`)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

# old module -> the modules its public names now live in (the first one is the main heir)
MODULES = {
    "pyflowmap.train": ("pyflowmap.toy2d.train", "pyflowmap.training"),
    "pyflowmap.config": ("pyflowmap.toy2d.config", "pyflowmap.training.config"),
    "pyflowmap.data": ("pyflowmap.toy2d.data",),
    "pyflowmap.metrics": ("pyflowmap.toy2d.metrics",),
    "pyflowmap.evaluate": ("pyflowmap.toy2d.evaluate", "pyflowmap.sampling"),
    "pyflowmap.plots": ("pyflowmap.toy2d.plots",),
    "pyflowmap.checkpoint": ("pyflowmap.training.checkpoint",),
    "pyflowmap._dtypes": ("pyflowmap._tensors",),
}
RENAMED = {"pyflowmap.config": {"ConfigBase": "LoopConfig"}}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        heirs = [importlib.import_module(m) for m in MODULES[spec.name]]
        warnings.warn(f"{spec.name} moved to {' and '.join(MODULES[spec.name])}; import from there",
                      DeprecationWarning, stacklevel=2)
        if len(heirs) == 1:
            return heirs[0]
        module = types.ModuleType(spec.name, heirs[0].__doc__)
        for heir in reversed(heirs):  # the main heir's names win
            module.__dict__.update({k: v for k, v in vars(heir).items() if not k.startswith("_")})
        for old, new in RENAMED.get(spec.name, {}).items():
            module.__dict__[old] = module.__dict__[new]
        return module

    def exec_module(self, module):
        pass  # the target module is already executed


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())  # ahead of an editable install's finder, which may map old files


def forward(module: str, names: dict[str, str]):
    """A module ``__getattr__`` that serves ``names`` (old name -> new module) with a warning."""

    def __getattr__(name):
        if name in names:
            warnings.warn(f"{module}.{name} moved to {names[name]}.{name}", DeprecationWarning, stacklevel=2)
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
