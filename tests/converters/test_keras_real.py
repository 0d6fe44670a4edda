"""Files written and run by Keras itself (keras.applications ResNet50 and ResNet50V2).

Keras 3 + JAX live in their own venv (they need numpy >= 2; mxnet needs numpy < 1.24),
created on first use from tests/keras_real/requirements.txt (pinned) at ``.venv-keras``,
or taken from ``$BBADAPT_KERAS_PYTHON``. Measured on a 2-core machine: creating it takes
35 s with a warm pip cache, 100 s cold (690 MB); the Keras run below about a minute.

Keras builds both models, loads the same calibrated random weights as tests/converters/test_keras.py,
computes the logits, and saves the weights in all four ways it can; every file must
convert to a Gluon net whose output matches Keras's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters import readers
from tests.converters.test_keras import SPEC, gluon_out, keras_weights, max_rel, photos_nhwc

HERE = Path(__file__).parents[1] / "keras_real"
VENV = Path(__file__).resolve().parents[2] / ".venv-keras"
FILES = ["w.weights.h5", "m.keras", "m.h5", "w.h5", "order.weights.h5"]


def _keras_python() -> str:
    """Keras's interpreter: $BBADAPT_KERAS_PYTHON, or .venv-keras (created from the pinned requirements)."""
    given = os.environ.get("BBADAPT_KERAS_PYTHON")
    if given:
        return given
    python = VENV / "bin" / "python"
    stamp = VENV / ".installed"
    wanted = (HERE / "requirements.txt").read_text()
    if not (stamp.exists() and stamp.read_text() == wanted):
        subprocess.run([_base_python(), "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(HERE / "requirements.txt")],
                       check=True, timeout=900)
        stamp.write_text(wanted)
    return str(python)


def _base_python() -> str:
    """A plain CPython 3.11 to make the venv from (the test venv's own base interpreter)."""
    return str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}")


@pytest.fixture(scope="module")
def keras_dir(tmp_path_factory) -> Path:
    """Keras's outputs and files for both models (one Keras process)."""
    out = tmp_path_factory.mktemp("keras-real")
    arrays = {}
    for version in (1, 2):
        arrays[f"v{version}/x"] = photos_nhwc(version)
        for layer, tensors in keras_weights(version).items():
            for i, t in enumerate(tensors):
                arrays[f"v{version}/{layer}/{i}"] = t
    np.savez(out / "in.npz", **arrays)
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    done = subprocess.run([_keras_python(), str(HERE / "run_keras.py"), str(out / "in.npz"), str(out)],
                          check=False, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _strip_layer_names(src: Path, dst: Path) -> None:
    """A Keras 3 weights file as earlier Keras 3 releases wrote it: groups addressed by class and order only."""
    import h5py

    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "a") as f:
        for group in f["layers"].values():
            if "vars" in group and "name" in group["vars"].attrs:
                del group["vars"].attrs["name"]


def test_every_file_keras_writes_converts_to_what_keras_computes(keras_dir):
    """One test for both models: one Keras process (xdist may split parametrized cases across workers)."""
    for version in (1, 2):
        _check_version(keras_dir / f"v{version}", version)


def _check_version(out: Path, version: int) -> None:
    _strip_layer_names(out / "w.weights.h5", out / "order.weights.h5")
    keras_logits = np.load(out / "y.npy")
    params = None
    for name in FILES:
        c = readers.read(out / name)
        assert c.source_spec == SPEC[version] and c.provenance["keras_model"] == ("ResNet50", "ResNet50V2")[version - 1]
        assert max_rel(gluon_out(c.net, version), keras_logits) < 2e-4, (version, name)
        values = {k: p.data().asnumpy() for k, p in c.net._collect_params_with_prefix().items()}
        if params is None:
            params = values
        assert values.keys() == params.keys() and all(np.array_equal(values[k], params[k]) for k in values), name
    assert c.provenance["layer_names_from"] == "layer order (no names stored)"
