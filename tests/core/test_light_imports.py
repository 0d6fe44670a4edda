"""The core's data and math modules load without mxnet (CLI argument errors and manifest checks stay fast)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["bbadapt.core.blocks", "bbadapt.core.foldmath", "bbadapt.core.plan"])
def test_importing_does_not_import_mxnet(module):
    code = f"import {module}, sys; assert 'mxnet' not in sys.modules, 'mxnet imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_gluon_blocks_are_still_there_when_asked_for():
    from mxnet.gluon import HybridBlock

    from bbadapt.core import blocks
    from bbadapt.core.blocks import FrozenAffine, Identity

    assert issubclass(FrozenAffine, HybridBlock) and issubclass(Identity, HybridBlock)
    assert blocks.FrozenAffine is FrozenAffine  # defined once
    with pytest.raises(AttributeError):
        blocks.NoSuchBlock  # noqa: B018
