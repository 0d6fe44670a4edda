"""Output that native libraries write past Python: kept off the user's terminal.

MXNet's C++ core logs to file descriptor 2 directly (``Loading symbol saved by previous version
...``) and its Python layer prints diagnostics before raising (``infer_shape error. Arguments:``).
bbadapt's contract is one line on stderr for an error and its own progress lines otherwise, so
calls that may produce such output run inside :func:`quiet_native_output`, and what they wrote
is dropped: the exception they raise (turned into one line by the caller) says what matters.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Run the block with file descriptor 2 and ``sys.stdout`` going nowhere; both restored afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink, contextlib.redirect_stdout(io.StringIO()):
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
