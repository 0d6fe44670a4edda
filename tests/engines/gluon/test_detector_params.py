"""One way to save a detector's parameters, for bundles and training checkpoints alike."""

import mxnet as mx
import numpy as np
from mxnet.gluon import nn

from bbadapt.core.weights import sha256_of
from bbadapt.core.zoo import import_gluoncv
from bbadapt.engines.gluon.detector_bundle import save_detector_params


class _Detector(nn.HybridBlock):
    """Stands in for FasterRCNN's parameter layout: heads, plus the slot gluoncv fills on the first training step."""

    def __init__(self):
        super().__init__(prefix="det_")
        with self.name_scope():
            self.head = nn.Dense(4, in_units=3)
        self._target_generator = None

    def hybrid_forward(self, F, x):
        return self.head(x)


def _with_target_generator(net):
    """What gluoncv's ``FasterRCNN.target_generator`` does on the first training step: build it and initialize it."""
    import_gluoncv()
    from gluoncv.model_zoo.rcnn.faster_rcnn.rcnn_target import RCNNTargetGenerator

    net._target_generator = RCNNTargetGenerator(2, max_pos=8)
    net._target_generator.initialize()
    return net


def test_a_trained_detector_saves_without_its_target_generator_and_reloads_strictly(tmp_path):
    trained = _Detector()
    trained.initialize(mx.init.Normal(1.0), ctx=[mx.cpu(0), mx.cpu(1)])  # data parallel: one copy per device
    _with_target_generator(trained)
    assert any(k.startswith("_target_generator.") for k in trained._collect_params_with_prefix())

    path = tmp_path / "detector.params"
    digest = save_detector_params(trained, path)
    assert digest == sha256_of(path)
    saved = mx.nd.load(str(path))
    assert sorted(saved) == ["head.bias", "head.weight"]

    fresh = _Detector()  # as load_detector builds it: no target generator yet
    fresh.load_parameters(str(path), allow_missing=False, ignore_extra=False)
    assert np.array_equal(fresh.head.weight.data().asnumpy(), trained.head.weight.data(mx.cpu(1)).asnumpy())


def test_a_freshly_built_detector_saves_exactly_what_save_parameters_writes(tmp_path):
    net = _Detector()
    net.initialize(mx.init.Normal(1.0))
    net.save_parameters(str(tmp_path / "gluon.params"))
    save_detector_params(net, tmp_path / "ours.params")
    assert (tmp_path / "ours.params").read_bytes() == (tmp_path / "gluon.params").read_bytes()
