"""Model names -> Gluon builders, default input specs and pretrained downloads.

The registry is generated from the naming patterns of the two model zoos, not written out
per model: what differs between families (stem, where strides sit, pre-activation) is
discovered later by tracing the network (:mod:`bbadapt.trace`).
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from bbadapt.core.errors import ModelError, WeightsError

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


def build(name: str, pretrained: bool = False):
    """Build a zoo model with its parameters allocated (random init unless ``pretrained``).

    ``pretrained`` uses the libraries' own download and cache (``$MXNET_HOME/models``);
    a failed download becomes one :class:`WeightsError` line instead of retry chatter.
    """
    import mxnet as mx

    info = model_info(name)
    if pretrained:
        chatter = io.StringIO()
        cache = _CacheDirs()
        try:
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                net = instantiate(info, pretrained=True)
        except Exception as exc:  # noqa: BLE001 - requests/OSError/MXNetError: all mean "no weights here"
            cache.clean_up()  # no empty ~/.mxnet/models, lock files or partial downloads left behind
            raise WeightsError(
                f"could not download pretrained weights for {name} from {download_host()} ({_reason(exc)}); "
                "offline? pass --weights PATH (a .params file) or --weights random"
            ) from None
    else:
        net = instantiate(info, pretrained=False)
        net.initialize(mx.init.Xavier(magnitude=2.0))
    materialize(net, info.input_size)
    return net


DEFAULT_REPO = "https://apache-mxnet.s3-accelerate.dualstack.amazonaws.com/"  # mxnet's and gluoncv's model store


def download_host() -> str:
    """The host both model stores download from ($MXNET_GLUON_REPO overrides their default)."""
    from urllib.parse import urlsplit

    repo = os.environ.get("MXNET_GLUON_REPO", DEFAULT_REPO)
    return urlsplit(repo).netloc or repo


def _reason(exc: Exception) -> str:
    """The innermost cause of a failed download in a few words ("[Errno 111] Connection refused")."""
    import re

    text = str(exc)
    errno_text = re.findall(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if errno_text:
        return f"{type(exc).__name__}: {errno_text[-1].strip()}"
    first = text.splitlines()[0][:160] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class _CacheDirs:
    """The model cache ($MXNET_HOME/models, else ~/.mxnet/models) as it was before a download attempt,
    so that a failed attempt can remove what it created (the directories, a lock file, a partial zip)."""

    def __init__(self) -> None:
        home = Path(os.path.expanduser(os.environ.get("MXNET_HOME", os.path.join("~", ".mxnet"))))
        self.dirs = [home / "models", home]
        self.existed = {d: d.is_dir() for d in self.dirs}
        models = self.dirs[0]
        self.files = set(models.iterdir()) if self.existed[models] else set()

    def clean_up(self) -> None:
        models = self.dirs[0]
        if models.is_dir():
            for path in set(models.iterdir()) - self.files:
                if path.is_file() and (path.suffix in (".lock", ".zip", ".params") or ".zip." in path.name):
                    path.unlink(missing_ok=True)
        for d in self.dirs:
            if not self.existed[d] and d.is_dir() and not any(d.iterdir()):
                d.rmdir()


def materialize(net, size: int = 64) -> None:
    """Run one tiny forward pass so deferred-shape parameters get their shapes."""
    import mxnet as mx

    net(mx.nd.zeros((1, 3, size, size)))


def list_models(core_only: bool = False) -> list[ModelInfo]:
    return [m for m in MODELS.values() if m.core or not core_only]
