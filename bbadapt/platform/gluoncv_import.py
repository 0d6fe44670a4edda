"""The one way bbadapt imports gluoncv (its own module so that the zoo and the downloader can share it)."""

from __future__ import annotations


def import_gluoncv():
    """``import gluoncv`` that works when PyTorch >= 2 is installed too (the ``torch`` extra).

    gluoncv 0.10.5 imports torch at import time and raises RuntimeError ("Legacy
    torch==2.x detected") for any torch >= 2.0, even though bbadapt uses only its MXNet
    half. Hiding torch during that one import makes gluoncv take its "no torch" path;
    torch stays importable afterwards. Import gluoncv through here (once it is in
    ``sys.modules``, a plain ``import gluoncv`` anywhere is fine).
    """
    import sys

    if "gluoncv" in sys.modules:
        return sys.modules["gluoncv"]
    saved = sys.modules.get("torch")
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        import gluoncv
    finally:
        if saved is None:
            del sys.modules["torch"]
        else:
            sys.modules["torch"] = saved
    return gluoncv
