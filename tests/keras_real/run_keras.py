"""Run by Keras's own interpreter (see requirements.txt): build keras.applications ResNets,
load given weights, run them, and save them in every format Keras writes.

    python run_keras.py IN.npz OUTDIR

IN.npz holds, per model ("v1"/"v2"), ``<model>/x`` (NHWC input) and ``<model>/<layer>/<i>`` tensors.
OUTDIR/<model>/ receives ``y.npy`` (logits: classifier_activation=None) and the files
``w.weights.h5`` (Keras 3 save_weights), ``m.keras`` (Keras 3 archive), ``m.h5`` (legacy
full-model save) and ``w.h5`` (legacy weights-only layout).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import h5py
import keras
import numpy as np
from keras.src.legacy.saving import legacy_h5_format

BUILDERS = {"v1": keras.applications.ResNet50, "v2": keras.applications.ResNet50V2}


def main(npz_path: str, out_dir: str) -> None:
    data = np.load(npz_path)
    for key, builder in BUILDERS.items():
        prefix = f"{key}/"
        if f"{prefix}x" not in data.files:
            continue
        x = data[f"{prefix}x"]
        model = builder(weights=None, input_shape=x.shape[1:], classes=10, classifier_activation=None)
        for layer in model.layers:
            if layer.weights:
                layer.set_weights([data[f"{prefix}{layer.name}/{i}"] for i in range(len(layer.weights))])
        out = Path(out_dir) / key
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "y.npy", np.asarray(model.predict(x, verbose=0)))
        model.save_weights(out / "w.weights.h5")
        model.save(out / "m.keras")
        model.save(out / "m.h5")
        with h5py.File(out / "w.h5", "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, model)
    print("keras", keras.__version__, keras.backend.backend())


if __name__ == "__main__":
    main(*sys.argv[1:])
