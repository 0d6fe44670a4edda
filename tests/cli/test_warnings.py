"""A library's warning never reaches stderr raw: it becomes a note after success, and gives way to the error line.

The warnings are numpy's own (``inf - inf``), raised inside the CLI's real error handling.
"""

from __future__ import annotations

import numpy as np
import pytest
import typer

from bbadapt import cli
from bbadapt.platform.errors import WeightsError


def numpy_warns() -> None:
    with np.errstate(invalid="warn"):
        np.array([np.inf]) - np.array([np.inf])  # RuntimeWarning: invalid value encountered in subtract


def test_a_numpy_warning_in_a_command_that_succeeds_is_one_note_line(capsys):
    with cli.user_errors():
        numpy_warns()
        numpy_warns()
    err = capsys.readouterr().err
    assert err.count("bbadapt: note: RuntimeWarning: invalid value encountered in subtract") == 1, err
    assert len(err.strip().splitlines()) == 1 and "np.array" not in err  # no raw warning with its source line


def test_after_an_error_the_error_is_the_only_line(capsys):
    with pytest.raises(typer.Exit) as exited:
        with cli.user_errors():
            numpy_warns()
            raise WeightsError("weights.params: something is wrong")
    assert exited.value.exit_code == 1
    assert capsys.readouterr().err.strip().splitlines() == ["bbadapt: error: weights.params: something is wrong"]
