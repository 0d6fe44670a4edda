"""Gluon networks with the exact layout of the Keras applications ResNets.

Keras's ResNet50V2/101V2/152V2 have no twin in the Gluon model zoos: the stride of a stage
sits in the 3x3 conv of its *last* block, the shortcut of a strided block without a
projection is a 1x1 max-pool, some convs carry biases and others do not, and the stem
zero-pads before a max-pool that reads a raw (possibly negative) conv output. Zero padding
before a max-pool is not MXNet's pooling pad (which never wins the max), so it is an
explicit pad here. :func:`keras_resnet_v2` builds that graph; :func:`keras_resnet_v1` builds
the Gluon ``resnetN_v1`` zoo network (which matches Keras's v1 layout) with Keras's BN eps.

Both keep the zoo layout bbadapt relies on: a ``features`` sequence whose stages are
sequences of residual blocks (found by :func:`bbadapt.core.trace.find_stages`), then ``output``.
"""

from __future__ import annotations

import functools

from bbadapt.core.registry import architecture_builder

KERAS_EPS = 1.001e-5  # epsilon of every BatchNormalization in keras.applications ResNet/ResNetV2
WIDTHS = (64, 128, 256, 512)  # bottleneck width per stage; block outputs are 4x that


def _define():
    from mxnet.gluon import HybridBlock, nn

    class ZeroPadMaxPool(HybridBlock):
        """Keras ``ZeroPadding2D(pad)`` then ``MaxPooling2D(kernel, stride)`` ('valid').

        Padded cells are zeros that take part in the max, unlike MXNet's pooling pad.
        """

        def __init__(self, kernel: int = 3, stride: int = 2, pad: int = 1, **kwargs):
            super().__init__(**kwargs)
            self._pad, self._kernel, self._stride = pad, kernel, stride

        def hybrid_forward(self, F, x):
            p = self._pad
            x = F.pad(x, mode="constant", constant_value=0, pad_width=(0, 0, 0, 0, p, p, p, p))
            return F.Pooling(x, kernel=(self._kernel,) * 2, stride=(self._stride,) * 2, pool_type="max",
                             pooling_convention="valid")

        def __repr__(self) -> str:
            return f"ZeroPadMaxPool(pad={self._pad}, kernel={self._kernel}, stride={self._stride})"

    class NoTop(HybridBlock):
        """Stands for the classifier of a file saved without one (``include_top=False``): the
        output is then the pooled feature vector, as Keras's ``pooling="avg"`` gives it."""

        def hybrid_forward(self, F, x):
            return F.flatten(x)

        def __repr__(self) -> str:
            return "NoTop()"

    class KerasBlockV2(HybridBlock):
        """One Keras ``residual_block_v2``: pre-activation bottleneck, stride in the 3x3.

        ``shortcut``: "conv" (1x1 projection with bias, reads the pre-activation), "pool"
        (1x1 max-pool with the block's stride, reads the raw input) or "identity".
        """

        def __init__(self, width: int, in_channels: int, stride: int, shortcut: str, eps: float, **kwargs):
            super().__init__(**kwargs)
            self.shortcut = shortcut
            with self.name_scope():
                self.preact_bn = nn.BatchNorm(epsilon=eps, in_channels=in_channels)
                if shortcut == "conv":
                    self.conv0 = nn.Conv2D(4 * width, 1, strides=stride, in_channels=in_channels)
                elif shortcut == "pool":
                    self.pool0 = nn.MaxPool2D(pool_size=1, strides=stride)
                self.conv1 = nn.Conv2D(width, 1, use_bias=False, in_channels=in_channels)
                self.bn1 = nn.BatchNorm(epsilon=eps, in_channels=width)
                self.conv2 = nn.Conv2D(width, 3, strides=stride, padding=1, use_bias=False, in_channels=width)
                self.bn2 = nn.BatchNorm(epsilon=eps, in_channels=width)
                self.conv3 = nn.Conv2D(4 * width, 1, in_channels=width)

        def hybrid_forward(self, F, x):
            preact = F.Activation(self.preact_bn(x), act_type="relu")
            if self.shortcut == "conv":
                short = self.conv0(preact)
            elif self.shortcut == "pool":
                short = self.pool0(x)
            else:
                short = x
            y = F.Activation(self.bn1(self.conv1(preact)), act_type="relu")
            y = F.Activation(self.bn2(self.conv2(y)), act_type="relu")
            return short + self.conv3(y)

    class KerasResNetV2(HybridBlock):
        """Keras ``ResNet(preact=True, use_bias=True)``: the ResNetV2 family."""

        def __init__(self, blocks: list[int], classes: int, eps: float, **kwargs):
            super().__init__(**kwargs)
            with self.name_scope():
                self.features = nn.HybridSequential(prefix="")
                self.features.add(nn.Conv2D(64, 7, strides=2, padding=3, in_channels=3))  # conv1_pad + conv1_conv
                self.features.add(ZeroPadMaxPool(3, 2, 1))  # pool1_pad + pool1_pool
                in_channels = 64
                for k, (n, width) in enumerate(zip(blocks, WIDTHS, strict=True)):
                    last_stride = 1 if k == len(blocks) - 1 else 2
                    stage = nn.HybridSequential(prefix=f"stage{k + 1}_")
                    with stage.name_scope():
                        for i in range(n):
                            stride = last_stride if i == n - 1 else 1
                            shortcut = "conv" if i == 0 else ("pool" if stride > 1 else "identity")
                            stage.add(KerasBlockV2(width, in_channels, stride, shortcut, eps))
                            in_channels = 4 * width
                    self.features.add(stage)
                self.features.add(nn.BatchNorm(epsilon=eps, in_channels=in_channels))  # post_bn
                self.features.add(nn.Activation("relu"))  # post_relu
                self.features.add(nn.GlobalAvgPool2D())
                self.output = nn.Dense(classes, in_units=in_channels) if classes else NoTop()

        def hybrid_forward(self, F, x):
            return self.output(self.features(x))

    return ZeroPadMaxPool, NoTop, KerasBlockV2, KerasResNetV2


@functools.cache
def _classes():
    """The Gluon classes, defined on first use: importing this module must not import mxnet
    (``bbadapt formats`` and ``bbadapt inspect`` run without it)."""
    return _define()


def _checked(blocks, classes, eps) -> tuple[list[int], int, float]:
    """Builder arguments as they come from a manifest: validated, one ModelError line otherwise."""
    from bbadapt.platform.errors import ModelError

    try:
        blocks, classes, eps = [int(b) for b in blocks], int(classes), float(eps)
    except (TypeError, ValueError):
        raise ModelError(f"Keras ResNet arguments blocks={blocks!r}, classes={classes!r}, eps={eps!r} are not numbers") from None
    if len(blocks) != len(WIDTHS) or any(b < 1 for b in blocks) or classes < 0 or not eps > 0:
        raise ModelError(f"a Keras ResNet has {len(WIDTHS)} stages of >= 1 block each, classes >= 0 and eps > 0; "
                         f"got blocks={blocks}, classes={classes}, eps={eps}")
    return blocks, classes, eps


def _materialized(net, eps: float | None = None):
    import mxnet as mx

    from bbadapt.core.weights import batchnorms
    from bbadapt.core.zoo import materialize

    if eps is not None:
        for bn in batchnorms(net):
            bn._kwargs["eps"] = float(eps)  # read at every forward / hybridize: no other state to update
    net.initialize(mx.init.Xavier(magnitude=2.0))
    materialize(net, 64)
    return net


@architecture_builder("keras-resnet-v2")
def keras_resnet_v2(blocks: list[int], classes: int = 1000, eps: float = KERAS_EPS):
    """Keras ResNetV2 (``[3, 4, 6, 3]`` = ResNet50V2), random init, shapes allocated.

    ``classes=0`` builds the headless net of an ``include_top=False`` file (output = pooled features).
    """
    return _materialized(_classes()[3](*_checked(blocks, classes, eps)))


@architecture_builder("keras-resnet-v1")
def keras_resnet_v1(blocks: list[int], classes: int = 1000, eps: float = KERAS_EPS):
    """Gluon ``resnetN_v1`` (stride in the first 1x1, like Keras v1) with Keras's BN eps.

    Same structural names as ``mxnet.gluon.model_zoo.vision.resnetN_v1``; ``classes=0``
    replaces the classifier by a pass-through (output = pooled features).
    """
    from mxnet.gluon.model_zoo import vision

    from bbadapt.core.blocks import replace_block

    blocks, classes, eps = _checked(blocks, classes, eps)
    net = vision.ResNetV1(vision.BottleneckV1, blocks, [64] + [4 * w for w in WIDTHS], classes=max(classes, 1))
    if not classes:
        replace_block(net, "output", _classes()[1]())
    return _materialized(net, eps)
