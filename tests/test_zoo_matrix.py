"""Every supported model converts, in every fold x BN mode, and is proven equivalent.

Weights are seeded random with BatchNorm statistics calibrated on real photos; sizes are
small (48x48 and an odd 37x41; CIFAR 32x32 and 37x29) to keep the suite fast.
"""

import pytest

from bbadapt import adapt, zoo
from bbadapt.adapt import BN_MODES
from bbadapt.equivalence import check

from .conftest import calibrated, check_sizes

CORE = [m.name for m in zoo.list_models() if m.core]
STRETCH = [m.name for m in zoo.list_models() if not m.core]


def _convert_and_check(name, fold, bn):
    info = zoo.model_info(name)
    net = calibrated(name)
    adapted = adapt(net, info.source_spec, "rgb255", fold=fold, bn=bn)
    report = check(net, info.source_spec, adapted, sizes=check_sizes(name), n_photos=1, cifar=info.is_cifar)
    return adapted, report


def test_the_core_list_covers_every_family_of_the_brief():
    assert len(CORE) == 33
    assert {zoo.model_info(n).family for n in CORE} == {
        "gluon-v1", "gluon-v2", "gluoncv-v1b", "gluoncv-v1c", "gluoncv-v1d", "gluoncv-v1e", "gluoncv-v1s",
        "cifar-v1", "cifar-v2"}


@pytest.mark.slow
@pytest.mark.parametrize("bn", BN_MODES)
@pytest.mark.parametrize("name", CORE)
def test_exact_fold_is_equivalent_to_the_original_pipeline(name, bn):
    adapted, report = _convert_and_check(name, "bn", bn)
    assert adapted.exact and report["exact"]
    assert report["passed"], report["reasons"]
    assert report["worst_max_rel"] <= 1e-5
    assert all(p["fp64"]["ratio"] <= 2 for p in report["probes"])
    assert report["classification"]["top1_agreement"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("bn", BN_MODES)
@pytest.mark.parametrize("name", CORE)
def test_conv_fold_is_exact_inside_and_reported_approximate_at_the_border(name, bn):
    adapted, report = _convert_and_check(name, "conv", bn)
    assert not adapted.exact and report["exact"] is False
    stem = report["probes"][0]
    assert stem["name"] == "stem" and stem["interior"]["max_rel"] <= 1e-5
    assert stem["border"]["max_rel"] > 10 * stem["interior"]["max_rel"]
    assert report["passed"], report["reasons"]


@pytest.mark.slow
@pytest.mark.parametrize("name", STRETCH)
def test_further_resnet_kin_convert_without_model_specific_code(name):
    adapted, report = _convert_and_check(name, "bn", "fused")
    assert report["passed"] and report["worst_max_rel"] <= 1e-5, report["reasons"]
