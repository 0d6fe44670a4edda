"""The pre-activation ResNet of MXNet's original symbolic model zoo, rebuilt in Gluon.

The symbolic zoo graphs (``bn_data``, ``conv0``, ``stageN_unitM_*``) have no Gluon zoo twin
in general: unit counts, widths, where shortcut convs sit, per-layer BN eps and fix_gamma all
come from the graph. :func:`symbolic_resnet` builds exactly what a graph describes;
:func:`layer_paths` names the structural path of every graph layer.
"""

from __future__ import annotations

import functools

from bbadapt.core.registry import architecture_builder

UNIT_PARTS = {"bn1": "bn1", "conv1": "conv1", "bn2": "bn2", "conv2": "conv2", "bn3": "bn3", "conv3": "conv3",
              "sc": "downsample"}


def layer_paths(kwargs: dict) -> dict[str, str]:
    """Graph layer name -> structural block path in the built network (gluon v2 layout)."""
    paths = {"bn_data": "features.0", "conv0": "features.1", "bn0": "features.2",
             "bn1": f"features.{5 + len(kwargs['units'])}", "fc1": "output"}
    parts = ("bn1", "conv1", "bn2", "conv2") + (("bn3", "conv3") if kwargs["bottleneck"] else ())
    for k, n_units in enumerate(kwargs["units"], start=1):
        for m in range(1, n_units + 1):
            for part in parts + (("sc",) if m - 1 in kwargs["shortcuts"][k - 1] else ()):
                paths[f"stage{k}_unit{m}_{part}"] = f"features.{4 + k}.{m - 1}.{UNIT_PARTS[part]}"
    return paths


@functools.cache
def _network_class():
    from mxnet.gluon import HybridBlock

    class SymbolicResNetV2(HybridBlock):
        """Gluon's ResNetV2 layout (``features`` + ``output``) with the graph's own units."""

        def hybrid_forward(self, F, x):
            return self.output(self.features(x))

    return SymbolicResNetV2


def _set_bn(bn, eps: float, fix_gamma: bool) -> None:
    """Give a gluon BatchNorm the graph's eps and fix_gamma (gluon's blocks hard-code 1e-5)."""
    bn._kwargs["eps"] = eps
    bn._kwargs["fix_gamma"] = fix_gamma
    bn.gamma.grad_req = "null" if fix_gamma else "write"


@architecture_builder("mxnet-symbolic-resnet")
def symbolic_resnet(bottleneck: bool, units: list[int], channels: list[int], strides: list[int],
                    shortcuts: list[list[int]], classes: int, stem: dict, eps: float,
                    bn_eps: dict | None = None, fix_gamma: list[str] | None = None, materialize: bool = True):
    """A pre-activation ResNet as the symbolic zoo graph describes it (random init, shapes known).

    Arguments are what :func:`read_graph` reads from the graph; ``shortcuts[k]`` lists the
    (0-based) units of stage k+1 that have a 1x1 shortcut conv.
    """
    import mxnet as mx
    from mxnet.gluon import nn
    from mxnet.gluon.model_zoo.vision.resnet import BasicBlockV2, BottleneckV2

    block = BottleneckV2 if bottleneck else BasicBlockV2
    net = _network_class()(prefix="symbolicresnetv2_")
    with net.name_scope():
        net.features = features = nn.HybridSequential(prefix="")
        features.add(nn.BatchNorm())
        features.add(nn.Conv2D(channels[0], stem["kernel"], stem["stride"], stem["pad"], use_bias=False))
        features.add(nn.BatchNorm())
        features.add(nn.Activation("relu"))
        size, stride, pad = stem["pool"]
        features.add(nn.MaxPool2D(size, stride, pad, ceil_mode=bool(stem.get("pool_ceil", False))))
        for k, n_units in enumerate(units):
            stage = nn.HybridSequential(prefix=f"stage{k + 1}_")
            with stage.name_scope():
                for m in range(n_units):
                    stage.add(block(channels[k + 1], strides[k] if m == 0 else 1, m in shortcuts[k],
                                    in_channels=channels[k] if m == 0 else channels[k + 1], prefix=""))
            features.add(stage)
        features.add(nn.BatchNorm())
        features.add(nn.Activation("relu"))
        features.add(nn.GlobalAvgPool2D())
        features.add(nn.Flatten())
        net.output = nn.Dense(classes, in_units=channels[-1])
    paths = layer_paths({"units": units, "bottleneck": bottleneck, "shortcuts": shortcuts})
    blocks = _blocks(net)
    for name, path in paths.items():
        if isinstance(blocks[path], nn.BatchNorm):
            _set_bn(blocks[path], float((bn_eps or {}).get(name, eps)), name in (fix_gamma or ()))
    net.initialize(mx.init.Xavier(magnitude=2.0))
    if materialize:
        net(mx.nd.zeros((1, 3, 64, 64)))
    return net


def _blocks(net) -> dict:
    from bbadapt.core.trace import block_paths

    return block_paths(net)


