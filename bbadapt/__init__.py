"""bbadapt: model-zoo ResNets turned into verified, detection-ready backbones.

Data flows one way: weights -> Gluon net + input spec -> :func:`adapt` -> :func:`check`
-> bundle (:func:`save_backbone` / :func:`load_backbone`).
"""

__version__ = "0.1.0"

from .adapt import Adapted, adapt  # noqa: E402
from .errors import BbadaptError  # noqa: E402
from .spec import PRESETS, InputSpec, affine_map, parse_spec  # noqa: E402

__all__ = ["Adapted", "BbadaptError", "InputSpec", "PRESETS", "adapt", "affine_map", "parse_spec",
           "check", "load_backbone", "save_backbone"]


def __getattr__(name):  # check/bundle import matplotlib-free but heavy modules lazily
    if name == "check":
        from .check import check

        return check
    if name in ("load_backbone", "save_backbone"):
        from . import bundle

        return getattr(bundle, name)
    raise AttributeError(name)
