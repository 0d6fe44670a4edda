"""The blocks a rewrite puts into a network, and the surgery that puts them there.

``FrozenAffine`` is the "FrozenBatchNorm" of torchvision and detectron2 in Gluon form: a
constant per-channel ``x * scale + shift``. Gradients flow to its input, never to its
constants. New blocks take the prefix of the block they replace, so parameter names (and
the ``train_patterns`` regexes that select them) stay what they were.
"""

from __future__ import annotations

import functools

import numpy as np

from bbadapt.core.foldmath import bn_affine
from bbadapt.platform.errors import ModelError

BLOCK_CLASSES = ("FrozenAffine", "Identity")  # defined on first use: importing this module must not import mxnet


def make_frozen_affine(channels: int, prefix: str, scale: np.ndarray, shift: np.ndarray, ctx=None):
    """A constant per-channel affine block (NCHW), initialised to ``scale``/``shift``."""
    import mxnet as mx

    block = _classes()["FrozenAffine"](channels, prefix=prefix)
    block.initialize(mx.init.Zero(), ctx=ctx)
    block.scale.set_data(mx.nd.array(scale, dtype="float32"))
    block.shift.set_data(mx.nd.array(shift, dtype="float32"))
    return block


@functools.cache
def _classes() -> dict[str, type]:
    """The Gluon block classes, defined once, when first asked for (they subclass mxnet's HybridBlock)."""
    import mxnet as mx
    from mxnet.gluon import HybridBlock

    class FrozenAffine(HybridBlock):
        """``y = x * scale + shift`` per channel, with constants that are never trained.

        Computed by MXNet's BatchNorm kernel in global-stats mode with mean 0, variance 1
        and eps 1e-12 (so ``1/sqrt(var + eps)`` is exactly 1 in float32): one fused pass
        over memory, where a broadcast multiply + add takes two and trains ~9x slower on
        CPU. Results are bit-identical to ``x * scale + shift``.
        """

        def __init__(self, channels: int, **kwargs):
            super().__init__(**kwargs)
            self.channels = channels
            with self.name_scope():
                self.scale = self.params.get("scale", shape=(channels,), init=mx.init.One(),
                                             grad_req="null", differentiable=False)
                self.shift = self.params.get("shift", shape=(channels,), init=mx.init.Zero(),
                                             grad_req="null", differentiable=False)
                self.zero = self.params.get_constant("zero", mx.nd.zeros((channels,)))
                self.one = self.params.get_constant("one", mx.nd.ones((channels,)))

        def hybrid_forward(self, F, x, scale, shift, zero, one):
            return F.BatchNorm(x, scale, shift, zero, one, eps=1e-12, fix_gamma=False,
                               use_global_stats=True, name="fwd")

        def __repr__(self) -> str:
            return f"FrozenAffine({self.channels})"

    class Identity(HybridBlock):
        """Stands where a fused BatchNorm was, so the block tree keeps its shape."""

        def hybrid_forward(self, F, x):
            return x

        def __repr__(self) -> str:
            return "Identity(fused)"

    return {"FrozenAffine": FrozenAffine, "Identity": Identity}


def __getattr__(name: str):
    """``FrozenAffine`` and ``Identity`` as module attributes, created on first access (PEP 562)."""
    if name in BLOCK_CLASSES:
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _walk(net, path: str) -> list:
    """The blocks from the root down to ``path`` (inclusive)."""
    chain = [net]
    for name in path.split(".") if path else []:
        children = chain[-1]._children
        if name not in children:
            raise ModelError(f"no block at {path}")
        chain.append(children[name])
    return chain


def replace_block(net, path: str, new) -> None:
    """Put ``new`` where the block at ``path`` was (attribute children included)."""
    chain = _walk(net, path)
    parent, name = chain[-2], path.rpartition(".")[2]
    parent._children[name] = new
    if name in parent.__dict__:  # attribute children (self.bn1 = ...) bypass __setattr__'s type lock
        object.__setattr__(parent, name, new)
    for block in chain[:-1]:  # cached graphs of the ancestors are stale now
        if hasattr(block, "_clear_cached_op"):
            block._clear_cached_op()


def get_block(net, path: str):
    return _walk(net, path)[-1]


def param_value(param) -> np.ndarray:
    return param.data().asnumpy().astype(np.float64)


def set_conv(net, path: str, weight: np.ndarray, bias: np.ndarray | None) -> None:
    """Give the conv at ``path`` new weights and bias; rebuilt with a bias if it had none."""
    import mxnet as mx
    from mxnet.gluon import nn

    conv = get_block(net, path)
    if not isinstance(conv, nn.Conv2D):
        raise ModelError(f"{path} is {type(conv).__name__}, expected a Conv2D")
    if getattr(conv, "act", None) is not None:
        raise ModelError(f"{path} has a built-in activation; cannot fold into it")
    if bias is not None and conv.bias is None:
        kw = conv._kwargs
        ctx = conv.weight.list_ctx()
        new = nn.Conv2D(channels=kw["num_filter"], kernel_size=kw["kernel"], strides=kw["stride"],
                        padding=kw["pad"], dilation=kw["dilate"], groups=kw["num_group"],
                        layout=kw["layout"], use_bias=True, in_channels=weight.shape[1] * kw["num_group"],
                        prefix=conv.prefix)
        new.initialize(mx.init.Zero(), ctx=ctx)
        new.weight.grad_req = conv.weight.grad_req
        replace_block(net, path, new)
        conv = new
    conv.weight.set_data(mx.nd.array(weight, dtype=conv.weight.dtype))
    if bias is not None:
        conv.bias.set_data(mx.nd.array(bias, dtype=conv.bias.dtype))


def bn_constants(bn) -> tuple[np.ndarray, np.ndarray]:
    """A BatchNorm block's inference function as ``x * s + t`` (float64; :func:`~bbadapt.core.foldmath.bn_affine`).

    fix_gamma (Gluon ``scale=False``) means gamma is ignored whatever is stored; beta is
    always used (``center=False`` only freezes it); eps is the block's own.
    """
    kw = bn._kwargs
    if int(kw.get("axis", 1)) != 1:
        raise ModelError(f"BatchNorm {bn.name} normalizes axis {kw['axis']}; only NCHW (axis 1) is supported")
    gamma = None if kw["fix_gamma"] else param_value(bn.gamma)
    return bn_affine(gamma, param_value(bn.beta), param_value(bn.running_mean), param_value(bn.running_var),
                     float(kw["eps"]), fix_gamma=bool(kw["fix_gamma"]))
