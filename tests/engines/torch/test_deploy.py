"""Deploying a detector (issue 24): one ONNX or TorchScript file, uint8 pixels in, detections in input pixels out.

Specification:
* ``bbadapt export EXPORT --onnx FILE.onnx`` (or ``--torchscript FILE.pt``) writes the file only after the
  written bytes, run in onnxruntime (or ``torch.jit.load``), give the eager torchvision model's detections on
  real photos at three sizes that are not the traced size, one and two images a batch; the figures go to
  ``FILE.onnx.check.json`` (``FILE.pt.check.json``), the contract to the file's metadata;
* the ONNX file runs where only onnxruntime, numpy and Pillow are installed (``.venv-ort``), on decoded JPEGs;
* a torch-engine checkpoint deploys as an export does; BGR input (OpenCV) is an option;
* bad input to the file fails in onnxruntime itself; a refused export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from tests.engines.torch.test_torch_engine import RUN, SMALL, bbadapt, error_line, voc  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
ORT_ONLY_PYTHON = os.environ.get("BBADAPT_ORT_ONLY_PYTHON", str(REPO / ".venv-ort" / "bin" / "python"))
PHOTOS = sorted((REPO / "bbadapt" / "data" / "photos").glob("*.jpg"))
TORCH_ONLY_LOAD = """
import json, sys
sys.modules["bbadapt"] = None  # the file must load without bbadapt
import numpy as np, torch, torchvision  # torchvision registers the nms / roi_align ops the file calls
extra = {"bbadapt.json": ""}
model = torch.jit.load(sys.argv[1], _extra_files=extra)
images = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    outputs = model(images)
np.savez(sys.argv[3], *[o.numpy() for o in outputs])
print(json.loads(extra["bbadapt.json"])["classes"])
"""


def _export(root: Path, model: str, layout: str, input_range: str) -> Path:
    from bbadapt.pipeline import ConvertOptions, DetectorOptions, convert
    from converters.writers.torchvision_detector import export

    convert(model, root / "bundle", ConvertOptions(weights="random", sizes=[(64, 64)]),
            DetectorOptions(classes=["raccoon"], layout=layout, freeze_at=2, overrides=SMALL))
    export(root / "bundle", root / "export", sizes=[(64, 80)], input_range=input_range)
    return root / "export"


@pytest.fixture(scope="module")
def c4(tmp_path_factory) -> Path:
    """A torchvision export of a GluonCV C4 detector on a resnet18_v1b body."""
    return _export(tmp_path_factory.mktemp("deploy-c4"), "resnet18_v1b", "c4", "01")


@pytest.fixture(scope="module")
def c4_onnx(c4, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """``bbadapt export C4 --onnx detector.onnx`` run once through the real CLI (mxnet and gluoncv unimportable)."""
    out = tmp_path_factory.mktemp("deploy-c4-onnx") / "deploy" / "detector.onnx"
    return bbadapt("export", c4, "--onnx", out), out


@pytest.fixture(scope="module")
def fpn_v2(tmp_path_factory) -> Path:
    """A torchvision export of an FPN detector on a Gluon resnet18_v2 (pre-activation) body, input 0..255."""
    return _export(tmp_path_factory.mktemp("deploy-fpn"), "resnet18_v2", "fpn", "255")


def eager(export: Path, batch: np.ndarray) -> list[tuple]:
    from bbadapt.engines.torch.deploy import eager_rows
    from bbadapt.engines.torch.export import load_model

    return eager_rows(load_model(export)[0], batch)


def assert_same(reference: list[tuple], deployed: list[tuple]) -> None:
    from bbadapt.engines.torch.deploy import BOX_REL_TOL
    from bbadapt.verify.detections import compare_detections

    assert len(reference) == len(deployed)
    for a, b in zip(reference, deployed):
        result = compare_detections(a, b, box_rel_tol=BOX_REL_TOL)
        assert result["passed"] and result["count_a"] > 0, result


def assert_proven(check_path: Path, form: str) -> dict:
    from bbadapt.engines.torch.deploy import CHECK_SIZES, TRACE_SIZE

    check = json.loads(check_path.read_text())
    assert check["passed"] and check["form"] == form
    cases = {(tuple(c["size"]), c["batch"], c["image"]) for c in check["cases"]}
    assert cases == {(s, n, i) for s in CHECK_SIZES for n in (1, 2) for i in range(n)}
    assert TRACE_SIZE not in {tuple(c["size"]) for c in check["cases"]}
    for case in check["cases"]:
        assert case["passed"] and case["count_a"] > 0
        if case["unmatched"]:  # near-ties across NMS: then the float64 eager model judged, and every box found a partner
            judged = case["float64"]["candidate_vs_reference_fp64"]
            assert case["float64"]["passed"] and judged["unmatched"] == 0 and judged["count_a"] == judged["count_b"]
        else:
            assert case["count_a"] == case["count_b"] and "float64" not in case
    return check


# --------------------------------------------------------------------------- ONNX


@pytest.mark.xdist_group("deploy-c4")
def test_onnx_of_a_c4_export_is_proven_at_three_sizes_and_two_batches_and_carries_its_contract(c4_onnx):
    import onnx

    result, out = c4_onnx
    assert result.returncode == 0, result.stderr
    assert "check passed: yes" in result.stdout and "detections without a partner" in result.stdout
    assert_proven(out.parent / "detector.onnx.check.json", "onnx")
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == ["raccoon"] and "uint8 [N, H, W, 3], RGB" in meta["input"]
    assert "short side to" in meta["resize"] and meta["bbadapt_version"]
    (images,) = model.graph.input
    assert images.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in images.type.tensor_type.shape.dim] == ["N", "H", "W", 3]
    assert [o.name for o in model.graph.output] == ["boxes", "scores", "labels", "batch_index"]
    assert model.opset_import[0].version == 17
    assert sorted(p.name for p in out.parent.iterdir()) == ["detector.onnx", "detector.onnx.check.json"]  # nothing staged


@pytest.mark.xdist_group("deploy-c4")
def test_the_onnx_file_runs_on_decoded_jpegs_where_only_onnxruntime_numpy_and_pillow_are(c4, c4_onnx, tmp_path):
    if not Path(ORT_ONLY_PYTHON).is_file():
        pytest.fail(f"{ORT_ONLY_PYTHON} missing: `make test` builds .venv-ort (scripts/deploy-requirements.txt)")
    bare = subprocess.run([ORT_ONLY_PYTHON, "-c", "import importlib.util as u; "
                           "print([m for m in ('torch', 'mxnet', 'bbadapt', 'onnxruntime') if u.find_spec(m)])"],
                          capture_output=True, text=True, cwd=tmp_path, env={"PATH": os.environ["PATH"]})
    assert bare.stdout.strip() == "['onnxruntime']", bare.stdout + bare.stderr
    out = c4_onnx[1]
    assert out.is_file(), c4_onnx[0].stderr
    example = REPO / "docs" / "examples" / "deploy_onnxruntime.py"
    for photo in PHOTOS[:2]:  # each JPEG at its own size, decoded in that venv
        run = subprocess.run([ORT_ONLY_PYTHON, str(example), str(out), str(photo)], capture_output=True, text=True,
                             cwd=tmp_path, env={"PATH": os.environ["PATH"]}, timeout=300)
        assert run.returncode == 0, run.stderr
        found = [json.loads(line) for line in run.stdout.splitlines()]
        decoded = tmp_path / "pixels.npy"
        subprocess.run([ORT_ONLY_PYTHON, "-c", "import sys, numpy as np; from PIL import Image; "
                        "np.save(sys.argv[2], np.asarray(Image.open(sys.argv[1]).convert('RGB'))[None])",
                        str(photo), str(decoded)], check=True, env={"PATH": os.environ["PATH"]})
        pixels = np.load(decoded)
        rows = ((np.zeros(len(found)))[None], np.array([d["score"] for d in found])[None],
                np.array([d["box"] for d in found]).reshape(1, -1, 4))
        assert {d["class"] for d in found} == {"raccoon"} and {d["file"] for d in found} == {str(photo)}
        from bbadapt.verify.detections import compare_detections

        result = compare_detections(eager(c4, pixels)[0], rows, box_tol=2e-3 + 1e-2, box_rel_tol=1e-5)
        assert result["passed"] and result["count_a"] > 0, result  # printed boxes are rounded to 1e-3 px


@pytest.mark.xdist_group("deploy-fpn")
def test_an_fpn_export_on_a_v2_body_deploys_for_bgr_frames(fpn_v2, tmp_path):
    import onnxruntime as ort

    from bbadapt.engines.torch.deploy import DeployOptions, check_images, deploy, deployed_rows

    out = tmp_path / "fpn.onnx"
    summary = deploy(fpn_v2, out, DeployOptions(form="onnx", channel_order="bgr"))
    assert summary["passed"] and summary["unmatched"] == 0 and summary["cases"] == 9
    assert_proven(tmp_path / "fpn.onnx.check.json", "onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rgb = check_images((300, 420), 2)
    bgr_out = deployed_rows(session.run(None, {"images": rgb[..., ::-1].copy()}), 2)
    assert_same(eager(fpn_v2, rgb), bgr_out)  # the file flips the channels itself
    rgb_fed = deployed_rows(session.run(None, {"images": rgb}), 2)
    from bbadapt.verify.detections import compare_detections

    assert not compare_detections(eager(fpn_v2, rgb)[0], rgb_fed[0])["passed"]  # RGB fed to a BGR file: not the same


# --------------------------------------------------------------------------- TorchScript


@pytest.mark.xdist_group("deploy-c4")
def test_torchscript_of_a_c4_export_is_proven_and_carries_its_contract(c4, c4_onnx, tmp_path):
    import torch

    onnx_check = c4_onnx[1].parent / "detector.onnx.check.json"
    shutil.copy(onnx_check, tmp_path)  # the ONNX file's proof stays where the TorchScript file's goes beside it
    result = bbadapt("export", c4, "--torchscript", tmp_path / "detector.pt")
    assert result.returncode == 0, result.stderr
    check = assert_proven(tmp_path / "detector.pt.check.json", "torchscript")
    assert check["runtime"] == "torch.jit.load" and check["opset"] is None
    assert (tmp_path / "detector.onnx.check.json").read_bytes() == onnx_check.read_bytes()
    extra = {"bbadapt.json": ""}
    torch.jit.load(str(tmp_path / "detector.pt"), _extra_files=extra)
    meta = json.loads(extra["bbadapt.json"])
    assert json.loads(meta["classes"]) == ["raccoon"] and "uint8 [N, H, W, 3], RGB" in meta["input"]


@pytest.mark.xdist_group("deploy-fpn")
def test_torchscript_of_an_fpn_v2_export_loads_with_torch_and_torchvision_alone(fpn_v2, tmp_path):
    from bbadapt.engines.torch.deploy import DeployOptions, check_images, deploy, deployed_rows

    out = tmp_path / "fpn.pt"
    deploy(fpn_v2, out, DeployOptions(form="torchscript"))
    assert_proven(tmp_path / "fpn.pt.check.json", "torchscript")
    batch = check_images((333, 517), 2)
    np.save(tmp_path / "batch.npy", batch)
    run = subprocess.run([sys.executable, "-c", TORCH_ONLY_LOAD, str(out), str(tmp_path / "batch.npy"),
                          str(tmp_path / "out.npz")], capture_output=True, text=True, cwd=tmp_path,
                         env={"PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == '["raccoon"]'
    saved = np.load(tmp_path / "out.npz")
    assert_same(eager(fpn_v2, batch), deployed_rows([saved[f"arr_{i}"] for i in range(4)], 2))


@pytest.mark.xdist_group("deploy-c4")
def test_a_torch_engine_checkpoint_deploys_with_its_trained_weights(c4, tmp_path):
    from bbadapt.engines.torch.deploy import DeployOptions, check_images, deploy, deployed_rows, runner

    work = tmp_path / "export"
    shutil.copytree(c4, work)
    data = voc(tmp_path / "data", [1, 2], [4])
    trained = bbadapt("train", work, "--dataset", f"voc:{data}", "--epochs", 1, *RUN[:-4], "--lr", "0.01")
    assert trained.returncode == 0, trained.stderr
    checkpoint = work / "checkpoints" / "last"
    out = tmp_path / "trained.onnx"
    result = bbadapt("export", checkpoint, "--onnx", out, "--deploy-input", "rgb")
    assert result.returncode == 0, result.stderr
    assert_proven(tmp_path / "trained.onnx.check.json", "onnx")
    batch = check_images((375, 500), 1)
    ours = deployed_rows(runner("onnx", out)(batch), 1)
    assert_same(eager(checkpoint, batch), ours)
    before = deployed_rows(runner("onnx", out)(batch), 1)
    deploy(c4, tmp_path / "untrained.onnx", DeployOptions(form="onnx"))
    untrained = deployed_rows(runner("onnx", tmp_path / "untrained.onnx")(batch), 1)
    from bbadapt.verify.detections import compare_detections

    assert not compare_detections(before[0], untrained[0])["passed"]  # the checkpoint's weights, not the export's


# --------------------------------------------------------------------------- bad input, refusals


@pytest.mark.xdist_group("deploy-c4")
def test_bad_input_to_the_deployed_file_fails_in_onnxruntime_itself(c4_onnx):
    import onnxruntime as ort

    out = c4_onnx[1]
    assert out.is_file(), c4_onnx[0].stderr
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)unexpected input data type|tensor\\(float\\)"):
        session.run(None, {"images": np.zeros((1, 64, 64, 3), np.float32)})  # float, not decoded uint8
    with pytest.raises(Exception, match="(?i)broadcast|dimension|shape"):
        session.run(None, {"images": np.zeros((1, 64, 64, 4), np.uint8)})  # RGBA
    with pytest.raises(Exception):  # noqa: B017 - whichever node meets it first names the empty image
        session.run(None, {"images": np.zeros((1, 0, 64, 3), np.uint8)})


@pytest.mark.xdist_group("deploy-c4")
def test_refusals_are_one_line_and_leave_nothing(c4, tmp_path, monkeypatch):
    from bbadapt.engines.torch import deploy as deploy_module
    from bbadapt.platform.errors import OutputError

    taken = tmp_path / "taken.onnx"
    taken.write_text("mine")
    line = error_line(bbadapt("export", c4, "--onnx", taken))
    assert "already exists" in line and taken.read_text() == "mine"
    line = error_line(bbadapt("export", c4, "--torchscript", tmp_path / "detector.onnx"))
    assert "name the torchscript file .pt" in line
    line = error_line(bbadapt("export", c4, "--onnx", tmp_path / "x.onnx", "--deploy-input", "bgra"))
    assert "--deploy-input 'bgra'" in line
    line = error_line(bbadapt("export", tmp_path / "nowhere", "--torchscript", tmp_path / "x.pt"))
    assert "does not exist" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.onnx"]

    real_runner = deploy_module.runner

    def drops_one(form, path):  # a runtime that loses the last detection of every image
        run = real_runner(form, path)
        return lambda batch: [o[:-1] for o in run(batch)]

    monkeypatch.setattr(deploy_module, "runner", drops_one)
    with pytest.raises(OutputError, match="disagrees with the eager model.*nothing written"):
        deploy_module.deploy(c4, tmp_path / "sub" / "x.onnx", deploy_module.DeployOptions(form="onnx"))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["taken.onnx"]  # no file, no proof, no staging
