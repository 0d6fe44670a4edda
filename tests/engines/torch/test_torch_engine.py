"""``bbadapt train`` / ``bbadapt evaluate`` on a torchvision export: the torch engine (no mxnet on its path).

One export is built per module (random-weight ``resnet18_v1b``, C4, RPN/RoI counts scaled down for
128-px images; building it needs mxnet, the runs on it do not). The data: 3 training and 2
validation photos of the raccoon VOC set at short side 128. Every ``bbadapt`` run is a subprocess
whose ``mxnet`` and ``gluoncv`` are made unimportable (``sys.modules[name] = None``), so an import of
either anywhere on the torch path fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")

REPO = Path(__file__).resolve().parents[3]
RACCOON = REPO / "tests" / "data" / "raccoon_voc" / "VOC2017"
SMALL = dict(rpn_channel=256, roi_size=(7, 7), rpn_train_pre_nms=3000, rpn_train_post_nms=300,
             rpn_test_pre_nms=1000, rpn_test_post_nms=100, num_sample=32)
RUN = ["--cpu", "--short-side", "128", "--max-size", "192", "--lr", "0.0002", "--warmup", "0", "--log-interval", "1"]
NO_MXNET = ("import sys; sys.modules['mxnet'] = None; sys.modules['gluoncv'] = None; "
            "from bbadapt.cli import main; code = main(sys.argv[1:]); "
            "assert 'mxnet' not in sys.modules or sys.modules['mxnet'] is None; sys.exit(code)")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def bbadapt(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command line, in a process where mxnet and gluoncv cannot be imported."""
    return subprocess.run([sys.executable, "-c", NO_MXNET, *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=timeout)


def torchrun(*args, port: int, **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "bbadapt.cli", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), **kwargs)


def error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("bbadapt: error: "), result.stderr
    return lines[0]


def voc(root: Path, train: list[int], val: list[int]) -> Path:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in [*train, *val]:
        shutil.copy(RACCOON / "Annotations" / f"raccoon-{i}.xml", root / "Annotations")
        shutil.copy(RACCOON / "JPEGImages" / f"raccoon-{i}.jpg", root / "JPEGImages")
    (root / "ImageSets/Main/train.txt").write_text("".join(f"raccoon-{i}\n" for i in train))
    (root / "ImageSets/Main/val.txt").write_text("".join(f"raccoon-{i}\n" for i in val))
    return root


def presized(src: Path, out: Path, short: int) -> Path:
    """``src`` with every photo resized to short side ``short`` (PNG pixels, boxes scaled): both engines then read
    the very same pixels and resize nothing (GluonCV resizes uint8 with OpenCV, torchvision floats: same size rule,
    not the same pixels)."""
    from PIL import Image

    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for f in (src / "ImageSets/Main").glob("*.txt"):
        shutil.copy(f, out / "ImageSets/Main" / f.name)
    for xml in (src / "Annotations").glob("*.xml"):
        tree = ET.parse(xml)
        root = tree.getroot()
        im = Image.open(src / "JPEGImages" / f"{xml.stem}.jpg").convert("RGB")
        w, h = im.size
        k = short / min(w, h)
        nw, nh = round(w * k), round(h * k)
        assert min(nw, nh) == short
        im.resize((nw, nh), Image.BILINEAR).save(out / "JPEGImages" / f"{xml.stem}.jpg", format="PNG")
        root.find("size/width").text, root.find("size/height").text = str(nw), str(nh)
        for obj in root.iter("object"):
            for key, lim in (("xmin", nw), ("ymin", nh), ("xmax", nw), ("ymax", nh)):
                node = obj.find(f"bndbox/{key}")
                node.text = str(min(lim, max(1, round(float(node.text) * k))))
        tree.write(out / "Annotations" / xml.name)
    return out


def coco_from_voc(voc_root: Path, names: list[str], out: Path) -> Path:
    images, annotations = [], []
    for image_id, name in enumerate(names, start=7):
        root = ET.parse(voc_root / "Annotations" / f"{name}.xml").getroot()
        images.append({"id": image_id, "file_name": f"{name}.jpg", "width": int(root.findtext("size/width")),
                       "height": int(root.findtext("size/height"))})
        for obj in root.iter("object"):
            x1, y1, x2, y2 = (float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 3, "iscrowd": 0,
                                "bbox": [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], "area": (x2 - x1 + 1) * (y2 - y1 + 1)})
    out.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 3, "name": "raccoon"}]}))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(bundle, export, data): the GluonCV bundle, its torchvision export, the raccoon subset."""
    from bbadapt.pipeline import ConvertOptions, DetectorOptions, convert
    from converters.writers.torchvision_detector import export

    root = tmp_path_factory.mktemp("torch-engine")
    convert("resnet18_v1b", root / "bundle", ConvertOptions(weights="random", sizes=[(64, 64)]),
            DetectorOptions(classes=["raccoon"], layout="c4", freeze_at=2, overrides=SMALL))
    export(root / "bundle", root / "export", sizes=[(64, 80)], input_range="01")
    return root / "bundle", root / "export", voc(root / "data", [1, 2, 3], [4, 5])


def fresh(built, tmp_path: Path) -> Path:
    out = tmp_path / "export"
    shutil.copytree(built[1], out)
    return out


def records(directory: Path, event: str) -> list[dict]:
    lines = (directory / "train.log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


# --------------------------------------------------------------------------- train, checkpoints, resume


def test_train_writes_best_last_and_the_log_and_resume_continues_bit_identically(built, tmp_path):
    a, b = fresh(built, tmp_path / "a"), fresh(built, tmp_path / "b")
    data = built[2]
    whole = bbadapt("train", a, "--dataset", f"voc:{data}", "--epochs", 2, *RUN)
    assert whole.returncode == 0, whole.stderr
    ckpts = a / "checkpoints"
    assert os.readlink(ckpts / "last") == "epoch-0002" and (ckpts / "best").is_symlink()
    for name in ("config.json", "frcnn_runtime.py", "model.safetensors", "trainer.pt"):
        assert (ckpts / "epoch-0002" / name).is_file()
    config = json.loads((ckpts / "epoch-0002" / "config.json").read_text())
    assert config["checkpoint"]["epoch"] == 2 and config["checkpoint"]["iteration"] == 6
    assert config["checkpoint"]["engine"] == "torch" and config["checkpoint"]["val_metric"] == "voc07"
    assert [r["epoch"] for r in records(a, "epoch")] == [1, 2] and len(records(a, "val")) == 2
    assert len(records(a, "iter")) == 6 and "trained epochs 1..2" in whole.stdout
    assert not any(p.name.startswith(".") for p in ckpts.iterdir())  # no staging left over

    first = bbadapt("train", b, "--dataset", f"voc:{data}", "--epochs", 1, *RUN)
    assert first.returncode == 0, first.stderr
    again = bbadapt("train", b, "--dataset", f"voc:{data}", "--epochs", 2, *RUN)  # without --resume: refused
    assert again.returncode == 1 and "pass --resume" in error_line(again)
    resumed = bbadapt("train", b, "--dataset", f"voc:{data}", "--epochs", 2, "--resume", *RUN)
    assert resumed.returncode == 0, resumed.stderr
    assert (b / "checkpoints/epoch-0002/model.safetensors").read_bytes() == \
        (a / "checkpoints/epoch-0002/model.safetensors").read_bytes()
    changed = bbadapt("train", b, "--dataset", f"voc:{data}", "--epochs", 3, "--resume", *RUN[:-4], "--lr", "0.1")
    assert changed.returncode == 2 and "differ from it" in error_line(changed)


def test_bfloat16_autocast_trains_and_frozen_parts_stay_frozen(built, tmp_path):
    """One --amp run on the CPU (torch.autocast bfloat16): finite losses; the stem and stage 1 (--freeze-at 2 in
    the export: trainable_layers 3) and every FrozenBatchNorm2d constant are bit-identical afterwards."""
    import torch

    from bbadapt.engines.torch.export import load_model

    out = fresh(built, tmp_path)
    result = bbadapt("train", out, "--dataset", f"voc:{built[2]}", "--epochs", 1, "--amp", *RUN[:-4], "--lr", "0.01",
                     "--warmup", "0")
    assert result.returncode == 0, result.stderr
    start = records(out, "start")[0]
    assert start["amp"] == "bfloat16" and start["engine"] == "torch"
    assert all(r["loss"] == r["loss"] for r in records(out, "iter"))  # finite, not NaN
    before, _ = load_model(out)
    after, _ = load_model(out / "checkpoints/last")
    assert json.loads((out / "config.json").read_text())["backbone"]["trainable_layers"] == 3
    a, b = before.state_dict(), after.state_dict()
    frozen = [n for n in a if n.startswith(("backbone.body.conv1", "backbone.body.bn1", "backbone.body.layer1"))
              or ".bn" in n or "downsample.1" in n]
    assert frozen and all(torch.equal(a[n], b[n]) for n in frozen)
    moved = [n for n, p in before.named_parameters() if p.requires_grad and not torch.equal(a[n], b[n])]
    assert any(n.startswith("rpn") for n in moved) and any(n.startswith("backbone.body.layer3") for n in moved)


# --------------------------------------------------------------------------- evaluate


def test_evaluate_voc07_voc12_and_coco_ap_by_default_on_coco_data(built, tmp_path):
    export, data = built[1], built[2]
    result = bbadapt("evaluate", export, "--dataset", f"voc:{data}", "--cpu", "--short-side", "128")
    assert result.returncode == 0, result.stderr
    assert "voc07 mAP" in result.stdout and "on 2 images (short side 128)" in result.stdout
    voc12 = bbadapt("evaluate", export, "--dataset", f"voc:{data}", "--cpu", "--short-side", "128", "--metric", "voc12")
    assert voc12.returncode == 0 and "voc12 mAP" in voc12.stdout
    try:
        import pycocotools  # noqa: F401
    except ImportError:
        pytest.skip("pycocotools is not installed: COCO AP not exercised")
    ann = coco_from_voc(data, ["raccoon-4", "raccoon-5"], tmp_path / "val.json")
    coco = bbadapt("evaluate", export, "--dataset", f"coco:{ann}:{data / 'JPEGImages'}", "--cpu", "--short-side", "128",
                   "--metric", "auto")
    assert coco.returncode == 0, coco.stderr
    assert "coco mAP" in coco.stdout


def test_both_engines_give_the_same_map_on_the_same_pixels(built, tmp_path):
    """The export's detections are proven equal to GluonCV's (check.json); fed the same pixels (photos pre-resized
    to the short side, so neither engine resizes), the two engines' VOC07 mAP agree to 1e-6."""
    from bbadapt.engines.gluon.evaluate import EvaluateOptions
    from bbadapt.engines.gluon.evaluate import evaluate as gluon_evaluate
    from bbadapt.engines.torch.evaluate import evaluate as torch_evaluate

    data = presized(built[2], tmp_path / "data128", 128)
    options = EvaluateOptions(metric="voc07", split="val", short_side=128, max_size=1000)
    gluon = gluon_evaluate(built[0], f"voc:{data}", options)
    torch_ = torch_evaluate(built[1], f"voc:{data}", options)
    assert gluon["images"] == torch_["images"] == 2
    assert torch_["map"] == pytest.approx(gluon["map"], abs=1e-6)
    assert torch_["per_class"] == pytest.approx(gluon["per_class"], abs=1e-6)


# --------------------------------------------------------------------------- bad input: one line, nothing written


def test_bad_input_is_one_line_and_writes_nothing(built, tmp_path):
    data = built[2]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"format": "something-else", "format_version": 1}))
    damaged = fresh(built, tmp_path / "d")
    (damaged / "config.json").write_text("{ not json")
    good = fresh(built, tmp_path / "g")
    cases = [(foreign, f"voc:{data}", 1, "not a bbadapt torchvision detector export"),
             (damaged, f"voc:{data}", 1, "config.json"),
             (good, f"voc:{tmp_path / 'missing'}", 1, "does not exist"),
             (good, "imagenet:/x", 2, "unknown dataset")]
    for directory, dataset, code, words in cases:
        result = bbadapt("train", directory, "--dataset", dataset, *RUN)
        assert result.returncode == code and words in error_line(result), (directory, result.stderr)
        assert not (directory / "checkpoints").exists() and not (directory / "train.log.jsonl").exists()
    evaluated = bbadapt("evaluate", damaged, "--dataset", f"voc:{data}", "--cpu")
    assert evaluated.returncode == 1 and "config.json" in error_line(evaluated)


# --------------------------------------------------------------------------- torchrun


def test_torchrun_two_gloo_processes_train_the_same_parameters(built, tmp_path):
    out = fresh(built, tmp_path)
    job = torchrun("train", out, "--dataset", f"voc:{built[2]}", "--epochs", 1, "--batch-size", 2, *RUN, port=29631)
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr
    finish = records(out, "finish")[0]
    assert finish["workers"] == 2 and len(set(finish["param_digests"])) == 1 and len(finish["param_digests"]) == 2
    assert records(out, "epoch")[0]["batches"] == 2  # 3 images, 2 ranks x 1 image per step: 2 steps each
    assert os.readlink(out / "checkpoints/last") == "epoch-0001"


def test_a_killed_rank_ends_the_job_with_one_line_within_60_s_and_checkpoints_intact(built, tmp_path):
    out = fresh(built, tmp_path)
    job = torchrun("train", out, "--dataset", f"voc:{built[2]}", "--epochs", 50, "--batch-size", 2, *RUN, port=29632)
    first = out / "checkpoints" / "epoch-0001"
    deadline = time.time() + 240
    while not (first / "trainer.pt").is_file() and time.time() < deadline and job.poll() is None:
        time.sleep(0.5)
    assert (first / "trainer.pt").is_file(), job.stderr.read() if job.poll() is not None else "no checkpoint in 240 s"
    kept = {p.name: p.read_bytes() for p in first.iterdir()}
    victim = _rank_pid(job.pid, 1)
    os.kill(victim, signal.SIGKILL)
    killed = time.time()
    _, stderr = job.communicate(timeout=120)
    assert time.time() - killed < 60 and job.returncode != 0
    ours = [ln for ln in stderr.splitlines() if ln.startswith("bbadapt: error: ")]
    assert len(ours) == 1 and "another process of this job failed or was killed" in ours[0], stderr
    assert {p.name: p.read_bytes() for p in first.iterdir()} == kept
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())
    assert (out / "checkpoints" / "last").resolve().is_dir()


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker ``rank`` (a descendant of ``launcher`` whose environment says RANK=rank)."""
    for _ in range(50):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
                status = (entry / "status").read_text()
            except OSError:
                continue
            ppid = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:")))
            if f"RANK={rank}".encode() in env and _descends(ppid, launcher):
                return int(entry.name)
        time.sleep(0.2)
    raise AssertionError("rank process not found")


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        pid = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:")))
    return False
