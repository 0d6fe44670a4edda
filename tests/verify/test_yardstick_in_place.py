"""The check's one float64 net, nudged in place and restored, is the clone-per-draw yardstick bit for bit."""

import numpy as np

import bbadapt
from bbadapt.core.rewrite import clone
from bbadapt.verify.yardstick import SEED, nudge_in_place, nudged_twin, restore_twin, written_by_adaptation


def _params(net) -> dict[str, np.ndarray]:
    return {k: p.data().asnumpy() for k, p in net._collect_params_with_prefix().items()}


def test_nudging_in_place_and_restoring_gives_the_same_numbers_as_a_fresh_nudged_twin(net18v2):
    adapted = bbadapt.adapt(net18v2, "imagenet", "rgb255", bn="fused")
    written = written_by_adaptation(adapted.net, net18v2)
    assert written  # the fold and the fused BNs wrote numbers
    twin = clone(adapted.net, trainable=False, dtype="float64")
    clean = _params(twin)
    for draw in range(2):  # a second draw after a restore, as the check runs them
        if draw:
            restore_twin(twin, adapted.net, written)
            restored = _params(twin)
            assert all(np.array_equal(restored[k], clean[k]) for k in clean)
        nudge_in_place(twin, written, SEED + draw)
        fresh = _params(nudged_twin(adapted.net, net18v2, SEED + draw))
        now = _params(twin)
        assert fresh.keys() == now.keys()
        assert all(np.array_equal(fresh[k], now[k]) for k in fresh)
        moved = [k for k in clean if not np.array_equal(now[k], clean[k])]
        assert set(moved) <= written and moved
