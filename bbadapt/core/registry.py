"""What every weight reader yields, and the registry of architectures a bundle can name.

A reader turns a foreign file into a :class:`Converted`: a Gluon network holding the weights
under structural names, an ``arch`` record that rebuilds the same architecture later (bundle
reload, re-checks), the input spec the weights expect, and provenance for the manifest.
Nothing else crosses the boundary, so adapt, check, bundle and detector never know which
format the weights came from.

An ``arch`` record is either ``{"zoo": NAME}`` or ``{"builder": STABLE_NAME, "kwargs": {...}}``.
Builders live in :mod:`bbadapt.core.architectures` and register under a *stable* name that
does not depend on where the code sits: moving a module must never break a bundle on disk.
The arrow points one way: that package imports this registry, never the reverse, so
:func:`~bbadapt.core.architectures.rebuild` and ``arch_problem`` live there.
bbadapt 0.1.0 wrote module paths (``"converters.mxnet_symbol:symbolic_resnet"``); those are
mapped by :data:`ALIASES_0_1`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bbadapt.core.zoo import ModelInfo


@dataclass
class Converted:
    """Weights from any source, as a Gluon net plus what is needed to rebuild and judge it."""

    net: object  # a HybridBlock, parameters allocated and filled, shapes known
    arch: dict  # {"zoo": "resnet50_v1b"} or {"builder": "mxnet-symbolic-resnet", "kwargs": {...}}
    info: ModelInfo  # name/family/input size for reports and the check (is_cifar, default sizes)
    provenance: dict  # {"kind": "file", "format": ..., "path": ..., "sha256": ..., ...}

    @property
    def source_spec(self) -> str:
        return self.info.source_spec


def custom_info(name: str, family: str, source_spec: str, input_size: int = 224) -> ModelInfo:
    """A :class:`ModelInfo` for an architecture a reader provides (not a zoo model)."""
    return ModelInfo(name=name, family=family, library="bbadapt", source_spec=source_spec,
                     input_size=input_size, core=True)


_BUILDERS: dict[str, Callable] = {}

# Builder names as bbadapt 0.1.0 stored them in manifests -> today's stable names.
ALIASES_0_1 = {
    "converters.mxnet_symbol:symbolic_resnet": "mxnet-symbolic-resnet",
    "converters.keras_resnet_v2:keras_resnet_v2": "keras-resnet-v2",
    "converters.keras_resnet_v2:keras_resnet_v1": "keras-resnet-v1",
    "converters.detectron:build": "gluon-resnet-v1",
}


def architecture_builder(name: str) -> Callable[[Callable], Callable]:
    """Register the decorated function as the builder an ``arch`` record calls ``name``.

    Only registered functions can be called through ``architectures.rebuild``: a crafted manifest must
    not be able to make bbadapt import and call anything else (readers, writers, os.system).
    """
    def register(func: Callable) -> Callable:
        if _BUILDERS.setdefault(name, func) is not func:
            raise ValueError(f"architecture builder name {name!r} registered twice")
        return func

    return register


def registered() -> dict[str, Callable]:
    """The builders registered so far (importing :mod:`bbadapt.core.architectures` registers them all)."""
    return dict(_BUILDERS)


def stable_name(builder: str) -> str:
    """The current name of a builder as a manifest stores it (0.1.0 module paths are mapped)."""
    return ALIASES_0_1.get(builder, builder)
