"""Keras ResNets for tests, independent of bbadapt: layer specs, a numpy forward, file writers.

The layer specs and the forward follow keras/src/applications/resnet.py and resnet_v2.py
(Keras 3): NHWC tensors, HWIO kernels, explicit ZeroPadding2D before 'valid' convs and
pools, BatchNormalization eps 1.001e-5 (Keras 2's default 1e-3 for the old Caffe-style
ResNet50). Nothing here imports the converter: the test compares two implementations.

The writers produce the three HDF5 layouts Keras writes (see
keras/src/legacy/saving/legacy_h5_format.py and keras/src/saving/saving_lib.py):
legacy ``save_weights`` files, legacy full-model files (weights under ``model_weights``)
and Keras 3 ``.weights.h5`` (``layers/<class>[_k]/vars/<i>``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

BLOCKS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}
WIDTHS = [64, 128, 256, 512]


@dataclass
class Layer:
    """One weighted Keras layer: class, name, and the shapes of its variables in Keras order."""

    cls: str  # "Conv2D", "BatchNormalization", "Dense"
    name: str
    shapes: list[tuple[int, ...]]


def _conv(name: str, k: int, cin: int, cout: int, bias: bool) -> Layer:
    return Layer("Conv2D", name, [(k, k, cin, cout)] + ([(cout,)] if bias else []))


def _bn(name: str, c: int) -> Layer:
    return Layer("BatchNormalization", name, [(c,)] * 4)


def layer_specs(version: int, blocks: list[int], classes: int) -> list[Layer]:
    """Weighted layers in the order Keras 3 lists them in ``model.layers`` (observed with Keras 3.15)."""
    out = [_conv("conv1_conv", 7, 3, 64, True)] + ([_bn("conv1_bn", 64)] if version == 1 else [])
    cin = 64
    for s, (n, w) in enumerate(zip(blocks, WIDTHS, strict=True), start=2):
        for b in range(1, n + 1):
            p = f"conv{s}_block{b}_"
            if version == 1:
                out += [_conv(p + "1_conv", 1, cin, w, True), _bn(p + "1_bn", w),
                        _conv(p + "2_conv", 3, w, w, True), _bn(p + "2_bn", w)]
                if b == 1:
                    out += [_conv(p + "0_conv", 1, cin, 4 * w, True), _conv(p + "3_conv", 1, w, 4 * w, True),
                            _bn(p + "0_bn", 4 * w), _bn(p + "3_bn", 4 * w)]
                else:
                    out += [_conv(p + "3_conv", 1, w, 4 * w, True), _bn(p + "3_bn", 4 * w)]
            else:
                out += [_bn(p + "preact_bn", cin), _conv(p + "1_conv", 1, cin, w, False), _bn(p + "1_bn", w),
                        _conv(p + "2_conv", 3, w, w, False), _bn(p + "2_bn", w)]
                if b == 1:
                    out.append(_conv(p + "0_conv", 1, cin, 4 * w, True))
                out.append(_conv(p + "3_conv", 1, w, 4 * w, True))
            cin = 4 * w
    if version == 2:
        out.append(_bn("post_bn", cin))
    if classes:
        out.append(Layer("Dense", "predictions", [(cin, classes), (classes,)]))
    return out


def random_weights(specs: list[Layer], seed: int) -> dict[str, list[np.ndarray]]:
    """He-normal kernels, small biases, gamma in [0.5, 1.5]; BN statistics placeholder (calibrate next)."""
    rng = np.random.RandomState(seed)
    weights = {}
    for layer in specs:
        if layer.cls == "BatchNormalization":
            c = layer.shapes[0][0]
            weights[layer.name] = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), np.zeros(c), np.ones(c)]
        else:
            kernel_shape = layer.shapes[0]
            fan_in = int(np.prod(kernel_shape[:-1]))
            tensors = [rng.normal(0, np.sqrt(2.0 / fan_in), kernel_shape)]
            if len(layer.shapes) == 2:
                tensors.append(rng.normal(0, 0.2, layer.shapes[1]))
            weights[layer.name] = tensors
    return {k: [t.astype(np.float32) for t in v] for k, v in weights.items()}


# -- the Keras graph in numpy (NHWC, float64) ---------------------------------------------

def zero_pad(x: np.ndarray, p: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))


def conv2d(x: np.ndarray, tensors: list[np.ndarray], stride: int = 1) -> np.ndarray:
    """Keras Conv2D, padding 'valid' (pad explicitly before), HWIO kernel, optional bias."""
    kernel = tensors[0].astype(np.float64)
    kh, kw = kernel.shape[:2]
    windows = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # N,Ho,Wo,C,kh,kw
    y = np.tensordot(windows, kernel, axes=([3, 4, 5], [2, 0, 1]))
    return y + tensors[1] if len(tensors) == 2 else y


def max_pool(x: np.ndarray, k: int, stride: int) -> np.ndarray:
    """Keras MaxPooling2D, padding 'valid'."""
    return sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride].max(axis=(-2, -1))


class Forward:
    """Runs the Keras graph; with ``calibrate`` every BN first takes its input's batch statistics."""

    def __init__(self, weights: dict[str, list[np.ndarray]], eps: float, calibrate: bool = False):
        self.w, self.eps, self.calibrate = weights, eps, calibrate

    def bn(self, name: str, x: np.ndarray) -> np.ndarray:
        gamma, beta, mean, var = (t.astype(np.float64) for t in self.w[name])
        if self.calibrate:
            mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
            self.w[name][2:] = [mean.astype(np.float32), var.astype(np.float32)]
        return gamma * (x - mean) / np.sqrt(var + self.eps) + beta

    def conv(self, name: str, x: np.ndarray, stride: int = 1) -> np.ndarray:
        return conv2d(x, self.w[name], stride)

    def v1(self, x: np.ndarray, blocks: list[int]) -> np.ndarray:
        relu = lambda t: np.maximum(t, 0)
        x = relu(self.bn("conv1_bn", self.conv("conv1_conv", zero_pad(x, 3), 2)))
        x = max_pool(zero_pad(x, 1), 3, 2)
        for s, n in enumerate(blocks, start=2):
            for b in range(1, n + 1):
                p, stride = f"conv{s}_block{b}_", (2 if s > 2 and b == 1 else 1)
                short = self.bn(p + "0_bn", self.conv(p + "0_conv", x, stride)) if b == 1 else x
                y = relu(self.bn(p + "1_bn", self.conv(p + "1_conv", x, stride)))
                y = relu(self.bn(p + "2_bn", self.conv(p + "2_conv", zero_pad(y, 1))))  # 'same', stride 1
                x = relu(short + self.bn(p + "3_bn", self.conv(p + "3_conv", y)))
        return x

    def v2(self, x: np.ndarray, blocks: list[int]) -> np.ndarray:
        relu = lambda t: np.maximum(t, 0)
        x = self.conv("conv1_conv", zero_pad(x, 3), 2)
        x = max_pool(zero_pad(x, 1), 3, 2)  # zeros take part in the max: x may be negative here
        for s, n in enumerate(blocks, start=2):
            for b in range(1, n + 1):
                p = f"conv{s}_block{b}_"
                stride = 2 if b == n and s < 5 else 1  # the stride sits at the end of a stage
                pre = relu(self.bn(p + "preact_bn", x))
                if b == 1:
                    short = self.conv(p + "0_conv", pre)
                else:
                    short = max_pool(x, 1, stride) if stride > 1 else x
                y = relu(self.bn(p + "1_bn", self.conv(p + "1_conv", pre)))
                y = relu(self.bn(p + "2_bn", self.conv(p + "2_conv", zero_pad(y, 1), stride)))
                x = short + self.conv(p + "3_conv", y)
        return relu(self.bn("post_bn", x))

    def __call__(self, x_nhwc: np.ndarray, version: int, blocks: list[int]) -> np.ndarray:
        x = (self.v1 if version == 1 else self.v2)(x_nhwc.astype(np.float64), blocks)
        pooled = x.mean(axis=(1, 2))  # GlobalAveragePooling2D
        if "predictions" in self.w:
            kernel, bias = self.w["predictions"]
            return pooled @ kernel + bias  # logits: Keras applies softmax after this
        return pooled


def calibrated_weights(version: int, blocks: list[int], classes: int, x_nhwc: np.ndarray, seed: int = 0,
                       eps: float = 1.001e-5) -> dict[str, list[np.ndarray]]:
    """Random weights whose BN statistics are the real statistics of ``x_nhwc`` (normalized photos)."""
    weights = random_weights(layer_specs(version, blocks, classes), seed)
    Forward(weights, eps, calibrate=True)(x_nhwc, version, blocks)
    return weights


# -- Keras's HDF5 layouts ------------------------------------------------------------------

CAFFE_BRANCH = {"0": "1", "1": "2a", "2": "2b", "3": "2c"}


def caffe_name(name: str) -> str:
    """keras.applications name -> the Caffe-style name of the Keras <= 2.2.4 ResNet50."""
    fixed = {"conv1_conv": "conv1", "conv1_bn": "bn_conv1", "predictions": "fc1000"}
    if name in fixed:
        return fixed[name]
    stage_block, part, kind = name.rsplit("_", 2)
    stage, block = stage_block[4], int(stage_block.split("block")[1])
    return f"{'res' if kind == 'conv' else 'bn'}{stage}{chr(ord('a') + block - 1)}_branch{CAFFE_BRANCH[part]}"


VAR_NAMES = {"Conv2D": ["kernel", "bias"], "Dense": ["kernel", "bias"],
             "BatchNormalization": ["gamma", "beta", "moving_mean", "moving_variance"]}


def _write_list_attr(group, name: str, values: list[str], chunks: int = 1) -> None:
    data = np.array([v.encode("utf8") for v in values])
    if chunks == 1:
        group.attrs[name] = data
    else:  # what Keras does when the list exceeds the HDF5 object header limit
        for k, part in enumerate(np.array_split(data, chunks)):
            group.attrs[f"{name}{k}"] = part


def write_legacy(path, specs: list[Layer], weights: dict, *, full_model: bool = False, caffe: bool = False,
                 suffix: str = ":0", keras_version: str = "2.2.4", chunks: int = 1,
                 weightless: tuple[str, ...] = ("input_1", "conv1_pad", "pool1_pad", "avg_pool")) -> None:
    """A Keras 2 ``save_weights`` (or, with ``full_model``, ``model.save``) HDF5 file."""
    import h5py

    rename = caffe_name if caffe else (lambda n: n)
    with h5py.File(path, "w") as f:
        root = f
        if full_model:
            f.attrs["keras_version"] = keras_version.encode()
            f.attrs["backend"] = b"tensorflow"
            f.attrs["model_config"] = json.dumps({"class_name": "Functional", "config": {"name": "resnet"}}).encode()
            root = f.create_group("model_weights")
        names = list(weightless[:2]) + [rename(s.name) for s in specs] + list(weightless[2:])
        _write_list_attr(root, "layer_names", names, chunks)
        root.attrs["backend"] = b"tensorflow"
        root.attrs["keras_version"] = keras_version.encode()
        for name in weightless:
            _write_list_attr(root.create_group(name), "weight_names", [])
        for spec in specs:
            name = rename(spec.name)
            group = root.create_group(name)
            var_names = [f"{name}/{v}{suffix}" for v in VAR_NAMES[spec.cls][:len(spec.shapes)]]
            _write_list_attr(group, "weight_names", var_names)
            for var_name, value in zip(var_names, weights[spec.name], strict=True):
                group.create_dataset(var_name, data=value)


KERAS3_CLASS = {"Conv2D": "conv2d", "BatchNormalization": "batch_normalization", "Dense": "dense"}


def write_keras3(path, specs: list[Layer], weights: dict, *, names: bool = True) -> None:
    """A Keras 3 ``model.save_weights("x.weights.h5")`` file: ``layers/<class>[_k]/vars/<i>``."""
    import h5py

    used: dict[str, int] = {}

    def group_name(cls: str) -> str:
        used[cls] = used.get(cls, -1) + 1
        return cls if used[cls] == 0 else f"{cls}_{used[cls]}"

    with h5py.File(path, "w") as f:
        f.create_group("vars")  # the model's own (no) variables
        layers = f.create_group("layers")
        for weightless in ("input_layer", "zero_padding2d", "zero_padding2d_1", "max_pooling2d"):
            v = layers.create_group(weightless).create_group("vars")
            if names:
                v.attrs["name"] = weightless
        for spec in specs:
            v = layers.create_group(group_name(KERAS3_CLASS[spec.cls])).create_group("vars")
            if names:
                v.attrs["name"] = spec.name
            for i, value in enumerate(weights[spec.name]):
                v[str(i)] = value
