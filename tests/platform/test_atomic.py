"""bbadapt.platform.atomic: a full disk, however a library reports it, is one clear error and leaves nothing."""

from __future__ import annotations

import mxnet as mx
import pytest

from bbadapt.platform.atomic import staged_directory
from bbadapt.platform.errors import OutputError


def test_a_short_write_reported_by_mxnet_is_a_full_disk_even_with_space_left_beside_the_stage(tmp_path):
    """MXNet says only "FileStream.Write incomplete" (CI saw it with a few blocks still free).

    /dev/full makes every write short, as a full disk does; the stage's own disk has room,
    so only the message can tell.
    """
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"^cannot write output .*/out: No space left on device$"):
        with staged_directory(out):
            mx.nd.save("/dev/full", {"weight": mx.nd.zeros((1 << 20,))})
    assert list(tmp_path.iterdir()) == []


def test_any_other_library_error_inside_the_stage_is_not_mistaken_for_a_full_disk(tmp_path):
    with pytest.raises(mx.base.MXNetError, match="Cannot find argument"):
        with staged_directory(tmp_path / "out"):
            mx.nd.zeros((2,), bogus_argument=1)
    assert list(tmp_path.iterdir()) == []
