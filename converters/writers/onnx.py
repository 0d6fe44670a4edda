"""ONNX out: an adapted backbone as an ``.onnx`` file, checked by an ONNX runtime before it is kept.

Export goes through MXNet 1.9.1's own exporter (``mx.onnx.export_model``). Two of its
habits need correcting, both measured, not assumed:

* it has no opset argument: it stamps whatever ``onnx.defs.onnx_opset_version()`` the
  installed onnx reports (19 for the pinned onnx 1.14.1), while its operator translations
  stop at opset 13. The file then claims an opset whose operators it does not follow, and
  runtimes reject or misread it. The written model is re-stamped with opset
  :data:`OPSET` (and IR version :data:`IR_VERSION`, the one that introduced it), which is
  what the translations produce, and validated with ``onnx.checker``.
* its BatchNorm translation ignores ``fix_gamma``: a Gluon ``BatchNorm(scale=False)``
  (fix_gamma) ignores its stored gamma, ONNX's BatchNormalization does not. MXNet
  overwrites such a gamma with ones on its first forward pass, so the slip shows only for
  weights exported straight after loading a file whose gamma is not 1 -- exactly what an
  exporter does. Gamma of every fix_gamma BatchNorm is written as ones.

bbadapt's ``FrozenAffine`` is MXNet's BatchNorm kernel with constant zero mean, unit
variance and eps 1e-12 (:mod:`bbadapt.layers`); it exports as an ordinary
BatchNormalization with those constants. Fused BNs are gone already (``Identity``).

The check runs in the same call, before the file is renamed into place: the written file
is loaded by onnxruntime and run on the packaged real photos,
normalized with the bundle's target spec, beside MXNet running the bundle's backbone.
The model takes a float32 NCHW batch of any size (dynamic batch, height, width) in the
bundle's TARGET spec, and returns the backbone's output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from bbadapt.platform.errors import OutputError
from converters.readers.base import file_digest

OPSET = 13  # the highest opset mxnet 1.9.1's mx2onnx has translations for
IR_VERSION = 7  # ONNX IR version of opset 13 (onnx 1.8)
TOLERANCE = 1e-4  # max |onnx - mxnet| / max |mxnet|: different conv kernels, same float32 function
ORT_VERSION = "1.16.3"  # see docs: installed with --no-deps (its metadata asks numpy>=1.24.2; it runs on 1.23.5)
CHECK_SIZES = [(224, 224), (129, 161)]


ONNX_MODULES = ("onnx", "onnxruntime")


def require_onnx_packages() -> None:
    """Both packages ONNX export needs, or one line naming every one that is missing and how to install it."""
    import importlib

    missing = []
    for module in ONNX_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:  # a missing dependency of onnxruntime (flatbuffers, sympy ...) names itself
            missing.append(module if exc.name in (None, module) else f"{module} (its dependency {exc.name})")
    if missing:
        raise OutputError(f"ONNX export needs {' and '.join(missing)}, not installed: pip install 'bbadapt[onnx]' "
                          f"(onnx and onnxruntime's dependencies), then pip install --no-deps onnxruntime=={ORT_VERSION} "
                          "(its metadata asks numpy>=1.24, which mxnet 1.9.1 cannot use; see docs/formats.md)")


def _require_onnx():
    require_onnx_packages()
    import onnx

    return onnx


def _require_onnxruntime():
    require_onnx_packages()
    import onnxruntime

    return onnxruntime


def symbol_and_params(net) -> tuple[object, dict]:
    """The net traced to a symbol on input ``data``, and its parameters by name (fix_gamma gammas as ones)."""
    import mxnet as mx

    sym = net(mx.sym.var("data"))
    if isinstance(sym, (list, tuple)):
        sym = mx.sym.Group(list(sym))
    params = {p.name: p.data().copy() for p in net.collect_params().values()}
    graph = json.loads(sym.tojson())
    nodes = graph["nodes"]
    for node in nodes:
        attrs = node.get("attrs", {})
        if node["op"] == "BatchNorm" and attrs.get("fix_gamma", "True") == "True":
            gamma = nodes[node["inputs"][1][0]]["name"]
            params[gamma] = mx.nd.ones_like(params[gamma])
    used = set(sym.list_arguments()) | set(sym.list_auxiliary_states())
    return sym, {k: v for k, v in params.items() if k in used}


def to_onnx_bytes(net, size: tuple[int, int] = (224, 224)) -> bytes:
    """Serialized ONNX model (opset :data:`OPSET`, dynamic N/H/W) of a Gluon net taking ``data``."""
    import tempfile

    import mxnet as mx

    onnx = _require_onnx()
    sym, params = symbol_and_params(net)
    with tempfile.TemporaryDirectory(prefix="bbadapt-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            mx.onnx.export_model(sym, params, in_shapes=[(1, 3, *size)], in_types=[np.float32],
                                 onnx_file_path=str(path), dynamic=True, dynamic_input_shapes=[(None, 3, None, None)],
                                 run_shape_inference=False)
        except Exception as exc:  # noqa: BLE001 - mx2onnx raises bare AttributeError/NotImplementedError for unsupported ops
            reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise OutputError(f"mxnet's ONNX exporter failed on this network ({type(exc).__name__}: {reason})") from None
        model = onnx.load(str(path))
    restamp(model)
    return model.SerializeToString()


def restamp(model) -> None:
    """Set the default-domain opset to :data:`OPSET` and the IR version to match; weights as initializers only; validate."""
    onnx = _require_onnx()
    found = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if len(found) != 1:
        raise OutputError(f"unexpected opset imports in mxnet's ONNX output: {[(o.domain, o.version) for o in model.opset_import]}")
    found[0].version = OPSET
    constants = {t.name for t in model.graph.initializer}  # mx2onnx lists every weight as a graph input too
    inputs = [i for i in model.graph.input if i.name not in constants]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.ir_version = IR_VERSION
    model.producer_name = "bbadapt (via mxnet.onnx)"
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError / InferenceError
        raise OutputError(f"the exported ONNX model does not validate at opset {OPSET}: {str(exc).splitlines()[0][:200]}") from None


def runtime(payload: bytes):
    """(name, run(x) -> output) with onnxruntime, the runtime the check is judged by.

    onnx's own numpy reference evaluator is no substitute: with onnx 1.14.1 it took 290 s
    for one 64x64 ResNet-18 image and returned a different function (max rel 0.72).
    """
    ort = _require_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    try:
        session = ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise OutputError(f"onnxruntime {ort.__version__} refuses the exported model: {str(exc).splitlines()[0][:200]}") from None
    name = session.get_inputs()[0].name
    return f"onnxruntime {ort.__version__}", lambda x: session.run(None, {name: x.astype(np.float32)})[0]


def compare(payload: bytes, net, target, sizes=None, n_photos: int = 2) -> dict:
    """Run the ONNX model and MXNet on real photos (target-normalized); max abs/rel error per size."""
    import mxnet as mx

    from bbadapt.core.spec import parse_spec
    from bbadapt.verify import images

    target = parse_spec(target)
    name, run = runtime(payload)
    rows = []
    for size in sizes or CHECK_SIZES:
        raw, files = images.photos(size, limit=n_photos)
        x = target.normalize(raw)
        want = net(mx.nd.array(x)).asnumpy().astype(np.float64)
        got = np.asarray(run(x), dtype=np.float64)
        if got.shape != want.shape:
            raise OutputError(f"the ONNX model returns shape {got.shape} where MXNet returns {want.shape}")
        err = np.abs(got - want)
        scale = float(np.abs(want).max()) or 1.0
        rows.append({"size": list(size), "photos": files, "max_abs": float(err.max()), "max_rel": float(err.max()) / scale,
                     "top1_agree": float(np.mean(got.reshape(len(x), -1).argmax(1) == want.reshape(len(x), -1).argmax(1)))})
    worst = max(r["max_rel"] for r in rows)
    return {"runtime": name, "inputs": rows, "max_abs": max(r["max_abs"] for r in rows), "max_rel": worst,
            "tolerance": TOLERANCE, "passed": worst <= TOLERANCE}


def export_bundle(bundle_dir: str | Path, out: str | Path, force: bool = False, progress=None,
                  sizes: list[tuple[int, int]] | None = None, backbone: bool = False) -> dict:
    """Write a bundle's adapted backbone as ONNX (opset 13, dynamic N/H/W), checked against MXNet first.

    The model takes the bundle's TARGET spec input (what the bundle itself takes) and
    returns the backbone's output. ``backbone``: take the backbone of a detector bundle.
    Refuses an existing ``out`` unless ``force``; leaves nothing on failure. Returns a
    summary with the measured errors.
    """
    from bbadapt.platform.atomic import check_target, write_file
    from converters.writers.bundle_io import open_bundle

    say = progress or (lambda _m: None)
    out = Path(out)
    check_target(out, force, None, kind="file")
    if out.suffix != ".onnx":
        raise OutputError(f"{out}: name the ONNX export .onnx")
    onnx = _require_onnx()  # onnx and onnxruntime both, before minutes of work, not after
    say(f"reading bundle {bundle_dir}")
    bundle = open_bundle(bundle_dir, backbone=backbone)
    net = bundle.adapted.net
    say(f"exporting with mxnet.onnx, re-stamped to opset {OPSET}")
    payload = to_onnx_bytes(net)
    say("running the ONNX model beside MXNet on real photos")
    summary = compare(payload, net, bundle.target, sizes)
    if not summary["passed"]:
        raise OutputError(f"the ONNX model differs from the MXNet backbone (max rel {summary['max_rel']:.3g} > "
                          f"{TOLERANCE:g} with {summary['runtime']}); nothing written")
    write_file(out, lambda tmp: tmp.write_bytes(payload), force)
    say(f"wrote {out}")
    model = onnx.load_from_string(payload)
    return {"format": "onnx", "out": str(out), "sha256": file_digest(out), "opset": OPSET, "ir_version": IR_VERSION,
            "onnx": onnx.__version__, "model": bundle.model, "input_spec": bundle.target.to_string(),
            "input": model.graph.input[0].name, "outputs": [o.name for o in model.graph.output],
            "runtime": summary["runtime"], "check_max_abs": summary["max_abs"], "check_max_rel": summary["max_rel"],
            "check": summary}
