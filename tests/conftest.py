"""Shared fixtures: nets with calibrated random weights, cached per model name.

Random weights are seeded He-normal with BatchNorm statistics measured on real photos
(bbadapt.weights.randomize), so activations have the scale pretrained weights give.
"""

from __future__ import annotations

import functools
import shutil
import sys

import pytest

from bbadapt.core import zoo
from bbadapt.core.spec import PRESETS
from bbadapt.core.weights import randomize
from bbadapt.verify import images

zoo.import_gluoncv()  # before any test module imports gluoncv: it refuses to import beside torch >= 2

SMALL_SIZES = [(48, 48), (37, 41)]
CIFAR_SIZES = [(32, 32), (37, 29)]


@functools.lru_cache(maxsize=4)
def calibrated(name: str, seed: int = 0):
    """A zoo net with calibrated random weights (do not mutate: it is shared)."""
    info = zoo.model_info(name)
    net = zoo.build(name)
    if info.is_cifar:
        raw, _ = images.cifar_tiles(16)
    else:
        raw, _ = images.photos((96, 96), limit=4)
    randomize(net, seed, PRESETS[info.source_spec].normalize(raw))
    return net


def check_sizes(name: str):
    return CIFAR_SIZES if zoo.model_info(name).is_cifar else SMALL_SIZES


@pytest.fixture
def net18v2():
    return calibrated("resnet18_v2")


@pytest.fixture
def net18v1():
    return calibrated("resnet18_v1")


@pytest.fixture(scope="module", autouse=True)
def module_outputs_are_removed(request, tmp_path_factory):
    """Remove what a test module wrote under the session's temporary root once the module ends.

    pytest keeps every ``tmp_path_factory`` directory until the session ends: one run of the
    suite held 13 GB of bundles, checkpoints and exports at its end, and filled CI's disk.
    A module's outputs are kept when one of its tests failed, to be looked at.
    """
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        return
    for path in set(base.iterdir()) - before:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)


# The first pytest run's directories (Makefile FIRST_RUN) keep torch out of their worker processes: importing
# torch into a long-lived worker that has MXNet, scipy and matplotlib loaded segfaulted inside torch's native
# import (seen on CI and here), and xdist then waited forever for the lost worker. Tests there that need torch
# run it in a child process, as the CLI tests already do.
TORCH_FREE_DIRS = ("cli", "core", "platform", "verify", "bundle")
TORCH_MODULES = ("torch", "torchvision", "timm")


class _NoTorchHere:
    """A meta-path finder that refuses the torch family by name, with the reason."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in TORCH_MODULES:
            raise ImportError(f"{fullname} may not be imported in a test worker of tests/{{{','.join(TORCH_FREE_DIRS)}}} "
                              "beside MXNet (it crashed the worker); import it in a child process (tests/conftest.py)")
        return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    parts = item.path.relative_to(item.config.rootpath).parts
    guarded = len(parts) > 1 and parts[0] == "tests" and parts[1] in TORCH_FREE_DIRS
    blocker = _NoTorchHere()
    if guarded:
        sys.meta_path.insert(0, blocker)
    try:
        yield
    finally:
        if guarded:
            sys.meta_path.remove(blocker)
