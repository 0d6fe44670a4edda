"""Tracing discovers the wiring generically: the same code for every family."""

import pytest
from mxnet.gluon import nn

from bbadapt.core import zoo
from bbadapt.core.trace import block_paths, trace
from bbadapt.core.weights import batchnorms


def _built(name):
    return zoo.build(name)


@pytest.mark.parametrize("name", ["resnet18_v2", "resnet50_v2", "cifar_resnet20_v2", "se_resnet18_v2"])
def test_v2_nets_start_with_a_fix_gamma_data_batchnorm_read_by_the_first_conv(name):
    net = _built(name)
    graph = trace(net)
    assert graph.data_consumer_kind == "bn"
    data_bn = block_paths(net)[graph.data_bn]
    assert data_bn._kwargs["fix_gamma"] is True
    assert isinstance(block_paths(net)[graph.first_conv], nn.Conv2D)
    assert graph.unfusable[graph.data_bn].startswith("reads the network input")


@pytest.mark.parametrize("name, first_conv", [
    ("resnet18_v1", "features.0"), ("resnet50_v1b", "conv1"), ("resnet50_v1c", "conv1.0"),
    ("resnet50_v1d", "conv1.0"), ("resnet50_v1s", "conv1.0"), ("cifar_resnet20_v1", "features.0"),
])
def test_v1_family_nets_read_the_input_with_their_first_conv(name, first_conv):
    graph = trace(_built(name))
    assert (graph.data_consumer_kind, graph.data_consumer, graph.first_conv) == ("conv", first_conv, first_conv)


@pytest.mark.parametrize("name", ["resnet18_v1", "resnet50_v1", "resnet50_v1b", "resnet50_v1d", "cifar_resnet20_v1",
                                  "resnext50_32x4d"])
def test_every_batchnorm_of_a_post_activation_net_follows_its_own_conv(name):
    net = _built(name)
    graph = trace(net)
    assert graph.unfusable == {}
    assert len(graph.pairs) == len(batchnorms(net))


@pytest.mark.parametrize("name, blocks", [("resnet18_v2", 8), ("resnet50_v2", 16), ("cifar_resnet20_v2", 9)])
def test_pre_activation_batchnorms_are_found_and_kept_out_of_fusion(name, blocks):
    net = _built(name)
    graph = trace(net)
    # one bn1 per residual block plus the final BN read sums or the stem, never a lone conv output;
    # the data BN reads the input. Everything else follows its conv.
    assert len(graph.unfusable) == blocks + 2
    assert len(graph.pairs) + len(graph.unfusable) == len(batchnorms(net))
    assert set(graph.bn_order) == {c for _, c in graph.pairs} | set(graph.unfusable)


@pytest.mark.parametrize("name, jumps", [
    ("resnet18_v1", [4, 8, 16, 32]), ("resnet50_v2", [4, 8, 16, 32]), ("resnet101_v1d", [4, 8, 16, 32]),
    ("cifar_resnet20_v1", [1, 2, 4]),
])
def test_stages_are_discovered_with_their_strides(name, jumps):
    graph = trace(_built(name))
    assert [s.jump for s in graph.stages] == jumps
    assert graph.stem.jump == jumps[0]
    assert all(s.ring >= 1 for s in graph.stages)
