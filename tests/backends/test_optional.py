"""Optional packages: a missing package, a broken compiled extension or an unsupported version
is a reason with an install hint, never an exception; nothing is imported before it is asked."""

import importlib.abc
import importlib.machinery
import sys
import types

import pytest

import attnswap
from attnswap.backends.optional import OptionalPackage
from fakes import flash_attn_2, sageattention
from kernel_fixtures import install, recorder  # noqa: F401 (fixtures)


class _Raising(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import <name>`` raise ``error`` the way a wheel built for another torch does."""

    def __init__(self, name, error):
        self.name, self.error = name, error

    def find_spec(self, fullname, path, target=None):
        if fullname == self.name:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise self.error


def test_not_installed_is_a_reason_with_the_install_hint(install):
    backend = install("flash", {"flash_attn": None})
    assert backend.unavailable_reason == "flash_attn is not installed"
    (row,) = [b for b in attnswap.list_backends() if b.name == "flash"]
    assert not row.available and "pip install flash-attn" in row.install_hint and "flash-attn" in str(attnswap.list_backends())


@pytest.mark.parametrize(
    "error", [OSError("libcudart.so.12: cannot open shared object file"), ImportError("undefined symbol: _ZN3c10")]
)
def test_broken_binary_is_a_reason(install, monkeypatch, error):
    monkeypatch.delitem(sys.modules, "sageattention", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Raising("sageattention", error), *sys.meta_path])
    backend = install("sage", {})
    reason = backend.unavailable_reason
    assert type(error).__name__ in reason and str(error).split(":")[0] in reason and "reinstall sageattention" in reason


def test_missing_dependency_of_an_installed_package_is_not_called_not_installed(install, monkeypatch):
    monkeypatch.delitem(sys.modules, "sageattention", raising=False)
    missing = ModuleNotFoundError("No module named 'triton'", name="triton")
    monkeypatch.setattr(sys, "meta_path", [_Raising("sageattention", missing), *sys.meta_path])
    reason = install("sage", {}).unavailable_reason
    assert "No module named 'triton'" in reason and "not installed" not in reason


@pytest.mark.parametrize("version, ok", [("2.5.9", False), ("2.6.0", True), ("2.8.3.post1", True), ("3.0.0", False)])
def test_supported_version_range(install, recorder, version, ok):
    backend = install("flash", {"flash_attn": flash_attn_2(recorder, version=version)})
    reason = backend.package.reason()
    if ok:
        assert reason is None
        assert backend.unavailable_reason == "needs a CUDA GPU (torch.cuda.is_available() is False)"
    else:
        assert reason == f"flash_attn {version} is installed; attnswap supports >=2.6,<3"


def test_unknown_version_is_a_reason(install, recorder):
    module = sageattention(recorder)
    del module.__version__
    assert "cannot tell which sageattention version" in install("sage", {"sageattention": module}).unavailable_reason


def test_strict_patch_with_an_unavailable_backend_raises_with_reason_and_hint(install):
    install("xformers", {"xformers": None, "xformers.ops": None})
    with pytest.raises(attnswap.BackendUnavailable, match="xformers is not installed.*pip install xformers"):
        attnswap.patch(__import__("torch").nn.MultiheadAttention(8, 2), backend="xformers", strict=True)


def test_the_import_result_is_cached_until_forgotten(monkeypatch):
    calls = []
    module = types.ModuleType("attnswap_fake_pkg")
    module.__version__ = "1.0"
    real = importlib.import_module

    def counting(name, *args):
        calls.append(name)
        return module if name == "attnswap_fake_pkg" else real(name, *args)

    monkeypatch.setattr(importlib, "import_module", counting)
    package = OptionalPackage(("attnswap_fake_pkg",), "attnswap-fake-pkg", minimum="1.0")
    assert package.load() is module and package.load() is module and calls == ["attnswap_fake_pkg"]
    package.forget()
    package.load()
    assert calls == ["attnswap_fake_pkg"] * 2
