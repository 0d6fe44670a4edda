"""Model names -> Gluon builders, default input specs and pretrained downloads.

The registry is generated from the naming patterns of the two model zoos, not written out
per model: what differs between families (stem, where strides sit, pre-activation) is
discovered later by tracing the network (:mod:`bbadapt.trace`).
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass

from bbadapt.platform.errors import ModelError, WeightsError
from bbadapt.platform.gluoncv_import import import_gluoncv  # noqa: F401 - re-exported: bbadapt.core.zoo.import_gluoncv

# The ResNet paper's table, the one copy in bbadapt: depth -> (blocks per stage, bottleneck).
RESNET_LAYOUTS = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True),
                  101: ((3, 4, 23, 3), True), 152: ((3, 8, 36, 3), True)}
DEPTHS = tuple(RESNET_LAYOUTS)


def resnet_depth(blocks: tuple[int, ...], bottleneck: bool) -> int | None:
    """The depth of a ResNet with these blocks per stage, or None when the paper has no such net."""
    return next((d for d, layout in RESNET_LAYOUTS.items() if layout == (tuple(blocks), bool(bottleneck))), None)


@dataclass(frozen=True)
class ModelInfo:
    """What bbadapt needs to know about a zoo model before tracing it."""

    name: str
    family: str
    library: str  # "mxnet" (mxnet.gluon.model_zoo.vision) or "gluoncv"
    source_spec: str  # the input convention its pretrained weights were trained with
    input_size: int  # natural training resolution
    core: bool  # part of the supported core list (the rest prove the design is generic)

    @property
    def is_cifar(self) -> bool:
        return self.family.startswith("cifar")


def _registry() -> dict[str, ModelInfo]:
    models: dict[str, ModelInfo] = {}

    def add(name: str, family: str, library: str, core: bool, spec: str = "imagenet", size: int = 224) -> None:
        models[name] = ModelInfo(name, family, library, spec, size, core)

    for version in ("v1", "v2"):
        for d in DEPTHS:
            add(f"resnet{d}_{version}", f"gluon-{version}", "mxnet", True)
    for d in DEPTHS:
        add(f"resnet{d}_v1b", "gluoncv-v1b", "gluoncv", True)
    for variant in ("v1c", "v1d", "v1e", "v1s"):
        for d in (50, 101, 152):
            add(f"resnet{d}_{variant}", f"gluoncv-{variant}", "gluoncv", True)
    for d in (20, 56, 110):
        for version in ("v1", "v2"):
            add(f"cifar_resnet{d}_{version}", f"cifar-{version}", "gluoncv", True, "cifar", 32)
    # Further ResNet kin: same graph patterns, no per-model code.
    for version in ("v1", "v2"):
        for d in DEPTHS:
            add(f"se_resnet{d}_{version}", f"se-{version}", "gluoncv", False)
    for name in ("resnext50_32x4d", "resnext101_32x4d", "resnext101_64x4d"):
        add(name, "resnext", "gluoncv", False)
        add(f"se_{name}", "se-resnext", "gluoncv", False)
    for name in ("resnet18_v1b_0.89", "resnet50_v1d_0.86", "resnet50_v1d_0.48", "resnet50_v1d_0.37",
                 "resnet50_v1d_0.11", "resnet101_v1d_0.76", "resnet101_v1d_0.73"):
        add(name, "pruned-v1b", "gluoncv", False)
    add("cifar_resnext29_32x4d", "cifar-resnext", "gluoncv", False, "cifar", 32)
    return models


MODELS: dict[str, ModelInfo] = _registry()


def model_info(name: str) -> ModelInfo:
    """Look up a model, suggesting near names for typos."""
    try:
        return MODELS[name]
    except KeyError:
        near = difflib.get_close_matches(name, list(MODELS), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(near)}?" if near else "; run `bbadapt list` for the supported models"
        raise ModelError(f"unknown model {name!r}{hint}") from None


def instantiate(info: ModelInfo, pretrained: bool):
    """The zoo network itself, from the library that defines it (mxnet or gluoncv)."""
    if info.library == "mxnet":
        from mxnet.gluon.model_zoo import vision

        return vision.get_model(info.name, pretrained=pretrained)
    return import_gluoncv().model_zoo.get_model(info.name, pretrained=pretrained)


def build(name: str, pretrained: bool = False):
    """Build a zoo model with its parameters allocated (random init unless ``pretrained``).

    ``pretrained`` fetches the zoo's weights through :mod:`bbadapt.platform.download` (timeouts,
    sha1 verified, clean cache); see :func:`build_pretrained` for the file's provenance.
    """
    import mxnet as mx

    if pretrained:
        return build_pretrained(name)[0]
    info = model_info(name)
    net = instantiate(info, pretrained=False)
    net.initialize(mx.init.Xavier(magnitude=2.0))
    materialize(net, info.input_size)
    return net


def build_pretrained(name: str, say=None):
    """(net with the zoo's pretrained weights, :class:`~bbadapt.platform.download.Fetched` file record).

    The zoo's own builder loads the file (gluoncv's pruned nets, for one, load it their own
    way); only where the file comes from is bbadapt's: both zoos resolve
    ``model_store.get_model_file`` when a pretrained model is built, and for that call it is
    bbadapt's verified download.
    """
    from bbadapt.platform import download

    info = model_info(name)
    fetched: list = []

    def get_model_file(zoo_name: str, tag=None, root=None) -> str:  # the zoos' signature; tag/root: ours decide
        found = download.fetch(download.zoo_file(info.library, zoo_name), say=say)
        fetched.append(found)
        return str(found.path)

    with _model_file_source(info.library, get_model_file):
        try:
            net = instantiate(info, pretrained=True)
        except WeightsError:
            raise
        except Exception as exc:  # noqa: BLE001 - MXNetError/ValueError: a verified file the net does not take
            raise WeightsError(f"could not load the pretrained weights of {name} "
                               f"({type(exc).__name__}: {download.shorten(str(exc).splitlines()[0] if str(exc) else '')}); "
                               f"{download.HINT}") from None
    if not fetched:
        raise WeightsError(f"the {info.library} zoo built {name} without loading a weights file; {download.HINT}")
    materialize(net, info.input_size)
    return net, fetched[-1]


@contextlib.contextmanager
def _model_file_source(library: str, get_model_file):
    """Let ``library``'s zoo get its weights file from ``get_model_file`` for the duration."""
    if library == "mxnet":
        from mxnet.gluon.model_zoo import model_store
    else:
        import_gluoncv()
        from gluoncv.model_zoo import model_store
    original = model_store.get_model_file
    model_store.get_model_file = get_model_file
    try:
        yield
    finally:
        model_store.get_model_file = original


def materialize(net, size: int = 64) -> None:
    """Run one tiny forward pass so deferred-shape parameters get their shapes."""
    import mxnet as mx

    net(mx.nd.zeros((1, 3, size, size)))


def list_models(core_only: bool = False) -> list[ModelInfo]:
    return [m for m in MODELS.values() if m.core or not core_only]
