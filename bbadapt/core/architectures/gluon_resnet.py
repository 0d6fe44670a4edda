"""Gluon ``resnetN_v1`` with any class count: the body Detectron's ResNets map onto.

A zoo name fixes 1000 classes; a checkpoint trained for another head (Detectron's ``pred``)
needs the same body with its own class count, so it is a builder an ``arch`` record names.
"""

from __future__ import annotations

from bbadapt.core.registry import architecture_builder
from bbadapt.core.zoo import RESNET_LAYOUTS
from bbadapt.platform.errors import ModelError


@architecture_builder("gluon-resnet-v1")
def gluon_resnet_v1(depth: int, classes: int = 1000):
    """Gluon ``resnet<depth>_v1`` with ``classes`` outputs, initialized and materialized."""
    import mxnet as mx
    from mxnet.gluon.model_zoo.vision import get_resnet

    from bbadapt.core.zoo import materialize

    if not isinstance(depth, int) or not isinstance(classes, int) or depth not in RESNET_LAYOUTS or classes < 1:
        raise ModelError(f"no Gluon resnet_v1 with depth {depth!r} and {classes!r} classes")
    net = get_resnet(1, depth, classes=classes)
    net.initialize(mx.init.Xavier(magnitude=2.0))
    materialize(net, 64)
    return net
