"""timm ResNets in: every family with a GluonCV twin, from .safetensors, .pth and a save_for_hf folder, judged
against timm's own forward; the twin-less ones and bad config.json files refused in one line.

Runs where timm is installed (``bbadapt[timm]``); offline (``pretrained=False``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import bbadapt
from bbadapt.core import zoo
from bbadapt.core.spec import PRESETS, InputSpec, parse_spec
from bbadapt.core.weights import structural_params
from bbadapt.platform.errors import WeightsError
from bbadapt.verify import images
from converters import readers
from converters.readers import timm as timm_reader
from converters.readers.inspection import inspect_file
from tests.timm_models import forward, save_all, timm_model, verdict

pytest.importorskip("timm")
pytest.importorskip("safetensors")

# timm name -> (gluoncv twin, layout read off the tensors); the 101 stands for the deep families
FAMILIES = {
    "resnet18": ("resnet18_v1b", None, False),
    "resnet50": ("resnet50_v1b", None, False),
    "resnet50c": ("resnet50_v1c", (32, 32, 64), False),
    "resnet50d": ("resnet50_v1d", (32, 32, 64), True),
    "resnet50s": ("resnet50_v1s", (64, 64, 128), False),
    "resnet101d": ("resnet101_v1d", (32, 32, 64), True),
}
SIZE = (48, 56)
TARGETS = ("rgb255", "bgr255")
BN_FORMS = ("fused", "global-stats", "affine")


def raw_photos(size=SIZE, n=2) -> np.ndarray:
    return images.photos(size, limit=n)[0]


def gluon_out(net, x: np.ndarray, dtype="float32") -> np.ndarray:
    import mxnet as mx

    return net(mx.nd.array(x, dtype=dtype)).asnumpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("timm")
    return {name: (model, save_all(model, root, name)) for name, model in
            ((name, timm_model(name, seed=k)) for k, name in enumerate(FAMILIES))}


@pytest.fixture(scope="module")
def converted(saved):
    """Each family read from each form, once (reading a ResNet-101 builds it: seconds)."""
    return {(name, form): readers.read(path) for name, (_, files) in saved.items() for form, path in files.items()}


@pytest.mark.parametrize("name", FAMILIES)
def test_every_form_reads_as_the_gluoncv_twin_with_the_same_weights(saved, converted, name):
    twin, stem, avg_down = FAMILIES[name]
    _, files = saved[name]
    nets = {}
    for form, path in files.items():
        assert readers.detect(path).name == ("torchvision" if form != "folder" and stem is None else "timm")
        c = converted[name, form]
        assert c.arch == {"zoo": twin} and c.source_spec == "imagenet"
        if c.provenance["format"] == "timm":
            assert c.provenance["gluoncv_twin"] == twin and c.provenance["timm_arch"] == name
            assert c.provenance["layout"]["stem"] == (list(stem) if stem else None)
            assert c.provenance["layout"]["avg_down"] is avg_down
        nets[form] = {k: p.data().asnumpy() for k, p in structural_params(c.net).items()}
    assert nets["safetensors"].keys() == nets["pth"].keys() == nets["folder"].keys()
    for key, value in nets["safetensors"].items():  # the same tensors whichever way they were saved
        np.testing.assert_array_equal(value, nets["pth"][key])
        np.testing.assert_array_equal(value, nets["folder"][key])


@pytest.mark.parametrize("name", FAMILIES)
def test_the_adapted_twin_fed_raw_pixels_equals_timms_forward_fed_normalized_pixels(saved, converted, name):
    """Two target specs x every BN form, judged by the check's rule against timm itself (float64 timm the truth)."""
    model, _ = saved[name]
    c = converted[name, "folder" if name != "resnet50" else "pth"]
    raw = raw_photos()
    x = PRESETS["imagenet"].normalize(raw, "float64")
    ref32, truth = forward(model, x), forward(model, x, double=True)
    worst = 0.0
    for target in TARGETS:
        for bn in BN_FORMS:
            adapted = bbadapt.adapt(c.net, c.source_spec, target, bn=bn)
            got = gluon_out(adapted.net, PRESETS[target].normalize(raw))
            v = verdict(got, ref32, truth)
            assert v["passed"] and v["max_rel"] < 1e-5, (target, bn, v)
            worst = max(worst, v["max_rel"])
    print(f"{name}: worst max rel vs timm {worst:.2g}")


def test_a_folders_pretrained_cfg_sets_the_source_spec(tmp_path):
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.5, 0.75)
    spec = InputSpec("rgb", 1 / 255, mean, std)
    model = timm_model("resnet18", seed=7, spec=spec)
    files = save_all(model, tmp_path, "r18", data_config={"mean": mean, "std": std})
    assert json.loads((files["folder"] / "config.json").read_text())["pretrained_cfg"]["std"] == list(std)
    c = readers.read(files["folder"])
    assert parse_spec(c.source_spec).same_function(spec)
    assert "from" in c.provenance["input_spec_note"] and "config.json" in c.provenance["input_spec_note"]
    bare = readers.read(files["safetensors"])  # a bare state dict keeps today's default, and says so
    assert bare.source_spec == "imagenet"
    raw = raw_photos()
    x = spec.normalize(raw, "float64")
    adapted = bbadapt.adapt(c.net, c.source_spec, "rgb255")
    v = verdict(gluon_out(adapted.net, raw.astype(np.float32)), forward(model, x), forward(model, x, double=True))
    assert v["passed"], v


def test_a_folders_weights_file_named_alone_is_read_with_its_config(saved):
    folder = saved["resnet50"][1]["folder"]
    c = readers.read(folder / "model.safetensors")
    assert readers.detect(folder / "model.safetensors").name == "timm" and c.provenance["folder"] == str(folder.resolve())
    assert sorted(c.provenance["files"]) == sorted(str((folder / n).resolve()) for n in ("config.json", "model.safetensors"))


def test_the_layout_rule_names_timms_own_models_and_gluoncvs_zoo():
    """The rule's names exist: every twin in gluoncv's zoo, every timm name in timm's registry."""
    import timm

    for name, (twin, _, _) in FAMILIES.items():
        assert twin in zoo.MODELS and name in timm.list_models()
    for variant, depths in timm_reader.GLUONCV_DEPTHS.items():
        for depth in (18, 34, 50, 101, 152):
            assert (f"resnet{depth}_v1{variant}" in zoo.MODELS) == (depth in depths)


# ------------------------------------------------------------------ inspect


@pytest.mark.parametrize("form", ["safetensors", "pth", "folder"])
def test_inspect_names_the_timm_architecture_and_its_twin(saved, form):
    for name in ("resnet50d", "resnet50"):
        info = inspect_file(saved[name][1][form])
        guess = info["architecture"]["guess"]
        assert f"timm {name} " in guess and f"gluoncv twin {FAMILIES[name][0]}" in guess, guess
        assert info["status"] == "ok", info["problems"]
        if form == "folder":
            assert info["format"] == "timm" and info["input_spec"] == "imagenet"


# ------------------------------------------------------------------ refused


TWINLESS = {  # timm name -> what the one line must say
    "seresnet50": "squeeze-excitation",
    "resnet50_gn": "no running statistics",
    "resnet50t": "deep stem of widths 24/32/64",
    "resnet26": "(2, 2, 2, 2) bottleneck blocks",  # torchvision names: the torchvision reader says it
    "resnet18d": "gluoncv has no resnet18_v1d",
    "resnetrs50": "strided-conv stem pool",
}


@pytest.fixture(scope="module")
def twinless(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("twinless")
    out = {}
    for name in TWINLESS:
        model = timm.create_model(name, pretrained=False)
        path = root / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        out[name] = path
    folder = root / "seresnet50-folder"
    timm.models.save_for_hf(timm.create_model("seresnet50", pretrained=False), str(folder), safe_serialization=True)
    out["folder"] = folder
    return out


@pytest.mark.parametrize("name", TWINLESS)
def test_a_twinless_timm_resnet_is_refused_in_one_line_saying_what_and_why(twinless, name):
    with pytest.raises(WeightsError) as err:
        readers.read(twinless[name])
    msg = str(err.value)
    assert TWINLESS[name] in msg and "\n" not in msg, msg
    if name != "resnet26":
        assert "no GluonCV twin" in msg
        assert inspect_file(twinless[name])["architecture"]["gluoncv_twin"] is None


def test_a_folder_names_the_twinless_architecture(twinless):
    with pytest.raises(WeightsError, match="timm seresnet50 has no GluonCV twin: .*squeeze-excitation"):
        readers.read(twinless["folder"])


def _folder_with_config(saved, tmp_path, change) -> str:
    folder = tmp_path / "r18"
    shutil.copytree(saved["resnet18"][1]["folder"], folder)
    config = json.loads((folder / "config.json").read_text())
    change(config["pretrained_cfg"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


BAD_CONFIGS = {
    "missing std": (lambda cfg: cfg.pop("std"), "pretrained_cfg has no std"),
    "non-numeric std": (lambda cfg: cfg.__setitem__("std", ["a", 0.2, 0.2]), "std must be 1 or 3 finite numbers"),
    "zero std": (lambda cfg: cfg.__setitem__("std", [0.229, 0.0, 0.225]), "std must be positive"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_a_bad_config_std_is_one_line(saved, tmp_path, case):
    change, message = BAD_CONFIGS[case]
    with pytest.raises(WeightsError, match=message) as err:
        readers.read(_folder_with_config(saved, tmp_path, change))
    assert "\n" not in str(err.value)


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "bbadapt.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_the_command_line_refuses_bad_configs_and_twinless_models_with_exit_1_and_writes_nothing(saved, twinless,
                                                                                                 tmp_path):
    """One process per refusal is slow (mxnet imports); the bad inputs go through one `convert` each, in two runs."""
    cases = [_folder_with_config(saved, tmp_path / case.replace(" ", "-"), BAD_CONFIGS[case][0]) for case in BAD_CONFIGS
             if not (tmp_path / case.replace(" ", "-")).mkdir()]
    for weights in (cases[2], twinless["resnet50t"]):
        result = cli("convert", "--weights", weights, "--to", "rgb255", "--out", tmp_path / "out", cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        errors = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith("... ")]
        assert len(errors) == 1 and errors[0].startswith("bbadapt: error: ") and "Traceback" not in result.stderr, \
            result.stderr
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out") or p.name.startswith("out")]
