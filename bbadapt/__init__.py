"""bbadapt: model-zoo ResNets turned into verified, detection-ready backbones.

Data flows one way: weights -> Gluon net + input spec -> :func:`adapt` -> :func:`check`
-> bundle (:func:`convert` writes one, :func:`load_backbone` reads it back).
"""

__version__ = "0.1.0"

from .adapt import Adapted, adapt
from .bundle import load_backbone, read_manifest
from .convert import convert, recheck
from .equivalence import check
from .errors import BbadaptError
from .spec import PRESETS, InputSpec, affine_map, parse_spec

__all__ = ["Adapted", "BbadaptError", "InputSpec", "PRESETS", "adapt", "affine_map", "check", "convert",
           "load_backbone", "parse_spec", "read_manifest", "recheck"]
