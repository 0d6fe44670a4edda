"""One training step of a detector bundle on fixed images; writes the gradient the optimizer applied.

Run two ways by tests/engines/gluon/test_horovod.py:

* ``horovodrun -np 2 ... python horovod_gradient_step.py BUNDLE VOC OUT --horovod``: worker r
  takes training image r; bbadapt's Horovod trainer (``hvd.DistributedTrainer`` behind
  :class:`bbadapt.engines.gluon.distributed.Workers`) sums the two gradients by allreduce;
* ``python horovod_gradient_step.py BUNDLE VOC OUT``: one process, both images (one per CPU
  context, so each image's loss is normalised alone, as on its own worker): the reference is the
  mean of the two gradients, i.e. SGD's gradient for the combined batch of 2.

Every image gets its own fixed seed for gluoncv's random anchor and proposal sampling, so
both runs draw the same samples. Written per process: ``OUT/grad-rank{r}.npz`` with
``grad * rescale_grad`` (what SGD applies) for every trainable parameter.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mxnet as mx
import numpy as np

from bbadapt.core.spec import InputSpec
from bbadapt.engines.gluon.datasets import open_dataset, spec_transforms
from bbadapt.engines.gluon.distributed import Workers
from bbadapt.engines.gluon.train import TrainConfig, _set_per_device_batch, detector_manifest, load_quietly

SHORT, MAX_SIZE = 128, 192


def fixed_shard(net, data, index: int, spec: InputSpec, ctx):
    """Training image ``index`` through gluoncv's train transform (no flip) and batchify, on ``ctx``."""
    from gluoncv.data.batchify import FasterRCNNTrainBatchify

    np.random.seed(1000 + index)  # the RPN target sampler draws from numpy
    transform = spec_transforms(spec, SHORT, MAX_SIZE, net, train=True, flip_p=0.0, ashape=net.ashape)
    batch = FasterRCNNTrainBatchify(net, 1)([transform(*data[index])])
    return [(elem[0] if isinstance(elem, (list, tuple)) else elem).as_in_context(ctx) for elem in batch]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle", type=Path)
    parser.add_argument("voc", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--horovod", action="store_true")
    args = parser.parse_args(argv)

    from gluoncv.model_zoo.rcnn.faster_rcnn.data_parallel import ForwardBackwardTask

    from bbadapt.engines.gluon.train import _trainer

    workers = Workers.horovod() if args.horovod else Workers()
    ctx = workers.contexts([mx.cpu()]) if args.horovod else [mx.cpu(0), mx.cpu(1)]
    manifest = detector_manifest(args.bundle)
    net = load_quietly(args.bundle, ctx)
    _set_per_device_batch(net, 1)
    config = TrainConfig(lr=0.01, momentum=0.9, wd=1e-4, batch_size=2)
    trainer = _trainer(net, config, ctx, workers)  # bbadapt's: the trainable parameters, horovod's trainer
    data = open_dataset(f"voc:{args.voc}", manifest.classes, "train", drop_empty=True)
    spec = manifest.target_spec()
    images = [workers.rank] if args.horovod else [0, 1]
    losses = (mx.gluon.loss.SigmoidBinaryCrossEntropyLoss(from_sigmoid=False), mx.gluon.loss.HuberLoss(rho=1 / 9),
              mx.gluon.loss.SoftmaxCrossEntropyLoss(), mx.gluon.loss.HuberLoss(rho=1.0))
    task = ForwardBackwardTask(net, trainer, *losses, mix_ratio=1.0, amp_enabled=False)
    for index, c in zip(images, ctx, strict=True):
        shard = fixed_shard(net, data, index, spec, c)
        mx.random.seed(2000 + index)  # the R-CNN proposal sampler draws from mxnet
        task.forward_backward(shard)
        mx.nd.waitall()
    trainable = {name: p for name, p in net.collect_train_params().items() if p.grad_req != "null"}
    if args.horovod:  # allreduce (a sum) into the gradients, then the trainer's scale: what SGD applies
        trainer.step(config.batch_size // workers.size)
        scale = trainer.optimizer.rescale_grad
        applied = {name: p.list_grad()[0].asnumpy().astype(np.float64) * scale for name, p in trainable.items()}
    else:  # the definition: the mean over the batch of the per-image gradients, in float64
        applied = {name: sum(g.asnumpy().astype(np.float64) for g in p.list_grad()) / config.batch_size
                   for name, p in trainable.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / f"grad-rank{workers.rank}.npz", **applied)
    workers.finish(net)


if __name__ == "__main__":
    main(sys.argv[1:])
