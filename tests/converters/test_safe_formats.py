"""The two container formats foreign weights arrive in: safetensors and pickle.

safetensors files are built here byte by byte from the format description (8-byte
little-endian header length, JSON header, raw data) and, where the reference
implementation (the ``safetensors`` package) is installed, cross-checked against it.
Pickles include hostile ones: loading must refuse them before any code runs.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bbadapt.platform.errors import WeightsError
from converters.readers import safe_pickle, safetensors_io
from tests import py2pickle


def _file(tmp_path: Path, header: dict, data: bytes, name: str = "t.safetensors", pad: bytes = b"") -> Path:
    text = json.dumps(header).encode() + pad
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _two_tensors(tmp_path: Path, **changes) -> Path:
    a = np.arange(6, dtype="<f4").reshape(2, 3)
    b = np.array([7, -8], dtype="<i8")
    header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]},
              "__metadata__": {"format": "pt"}}
    for key, value in changes.items():
        header[key.split("__")[0]][key.split("__")[1]] = value
    return _file(tmp_path, header, a.tobytes() + b.tobytes())


# ------------------------------------------------------------------ safetensors


def test_a_hand_built_safetensors_file_reads_back_exactly(tmp_path):
    arrays, metadata = safetensors_io.load(_two_tensors(tmp_path))
    assert metadata == {"format": "pt"}
    np.testing.assert_array_equal(arrays["a"], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(arrays["b"], [7, -8])
    assert arrays["a"].dtype == np.float32 and arrays["b"].dtype == np.int64


def test_what_bbadapt_writes_is_what_it_reads_and_scalars_survive(tmp_path):
    arrays = {"w": np.random.RandomState(0).randn(3, 2, 1, 1).astype(np.float32), "n": np.zeros((), np.int64)}
    safetensors_io.save(tmp_path / "x.safetensors", arrays, {"k": "v"})
    back, metadata = safetensors_io.load(tmp_path / "x.safetensors")
    assert metadata == {"k": "v"} and back["n"].shape == ()
    np.testing.assert_array_equal(back["w"], arrays["w"])


def test_the_reference_implementation_agrees_in_both_directions(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    arrays = {"conv1.weight": np.random.RandomState(1).randn(4, 3, 3, 3).astype(np.float32),
              "bn1.num_batches_tracked": np.array(3, np.int64), "h": np.ones(5, np.float16)}
    st.save_file(arrays, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    ours, metadata = safetensors_io.load(tmp_path / "ref.safetensors")
    assert metadata == {"format": "pt"}
    for k, v in arrays.items():
        np.testing.assert_array_equal(ours[k], v)
    safetensors_io.save(tmp_path / "ours.safetensors", arrays)
    theirs = st.load_file(str(tmp_path / "ours.safetensors"))
    for k, v in arrays.items():
        np.testing.assert_array_equal(theirs[k], v)


@pytest.mark.parametrize("change, message", [
    ({"a__dtype": "F8"}, "unknown dtype"),
    ({"a__data_offsets": [0, 20]}, "needs 24"),
    ({"b__data_offsets": [20, 36]}, "overlaps"),
    ({"b__data_offsets": [32, 48], "b__shape": [2]}, "ends at byte 48"),
    ({"a__shape": [-2, 3]}, "invalid shape"),
    ({"b__shape": [True, True]}, "invalid shape"),  # JSON true is a Python int subclass
])
def test_lying_headers_are_one_line_errors(tmp_path, change, message):
    path = _two_tensors(tmp_path, **change)
    with pytest.raises(WeightsError, match=message) as err:
        safetensors_io.load(path)
    assert "\n" not in str(err.value)


def test_truncated_files_and_garbage_are_refused(tmp_path):
    good = _two_tensors(tmp_path).read_bytes()
    for cut, message in ((len(good) - 4, "truncated"), (30, "runs past the end"), (5, "no header length")):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(good[:cut])
        with pytest.raises(WeightsError, match=message):
            safetensors_io.load(path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 6) + b"{not j" + b"\0" * 8)
    with pytest.raises(WeightsError, match="not valid UTF-8 JSON"):
        safetensors_io.load(junk)
    trailing = tmp_path / "trailing.safetensors"
    trailing.write_bytes(good + b"\0\0\0\0")
    with pytest.raises(WeightsError, match="bytes after the last tensor"):
        safetensors_io.load(trailing)


def test_an_existing_output_is_kept_unless_forced(tmp_path):
    from bbadapt.platform.errors import OutputError

    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists"):
        safetensors_io.save(out, {"a": np.zeros(1, np.float32)})
    assert out.read_bytes() == b"keep me"
    safetensors_io.save(out, {"a": np.zeros(1, np.float32)}, force=True)
    assert safetensors_io.load(out)[0]["a"].shape == (1,)
    assert [p.name for p in tmp_path.iterdir()] == ["o.safetensors"]  # no temp file left


# ------------------------------------------------------------------ pickles


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "builtins.exec"])
def test_a_malicious_pickle_is_refused_before_it_runs(tmp_path, protocol, attack):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    payload = {"os.system": _Evil(os.system, command),
               "builtins.eval": _Evil(eval, f"open({str(marker)!r}, 'w').close()"),
               "builtins.exec": _Evil(exec, f"open({str(marker)!r}, 'w').close()")}[attack]
    data = pickle.dumps({"conv1_w": np.zeros((2, 3), np.float32), "x": payload}, protocol=protocol)
    named = {"os.system": r"(os|posix)\.system", "builtins.eval": r"(builtins|__builtin__)\.eval",
             "builtins.exec": r"(builtins|__builtin__)\.exec"}[attack]  # pickle writes py2 names below protocol 3
    with pytest.raises(WeightsError, match=f"calls {named}") as err:
        safe_pickle.loads(data, origin="evil.pkl")
    assert "refused" in str(err.value) and not marker.exists()
    # and the same bytes would indeed have run the command under plain pickle (the test can fail):
    subprocess.run([sys.executable, "-c", "import pickle,sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=data, check=False, capture_output=True)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_arrays_and_plain_containers_load_with_every_protocol(protocol):
    from collections import OrderedDict

    value = {"blobs": OrderedDict(w=np.arange(12, dtype=np.float32).reshape(3, 4), b=np.float32(2.5)),
             "meta": [1, 2.0, "x", b"raw", (None, True)], "i": np.int64(3)}
    back = safe_pickle.loads(pickle.dumps(value, protocol=protocol))
    np.testing.assert_array_equal(back["blobs"]["w"], value["blobs"]["w"])
    assert back["blobs"]["b"] == np.float32(2.5) and back["meta"] == value["meta"] and back["i"] == 3


def test_python2_era_pickles_are_read_as_latin1():
    weights = np.array([[1.5, -2.0], [3.25, 255.0]], np.float32)  # bytes >= 0x80 in its raw data
    data = py2pickle.dumps({"blobs": {"res2_0_branch2a_w": weights}})
    assert b"_codecs" not in data and data[:2] == b"\x80\x02"
    back = safe_pickle.loads(data)
    np.testing.assert_array_equal(back["blobs"]["res2_0_branch2a_w"], weights)
    assert pickle.loads(data, encoding="latin1")["blobs"]["res2_0_branch2a_w"].tobytes() == weights.tobytes()


def test_object_arrays_subclasses_and_odd_codecs_are_refused():
    with pytest.raises(WeightsError, match="object-dtype"):
        safe_pickle.loads(pickle.dumps(np.array([1, "a"], dtype=object), protocol=2))
    with pytest.raises(WeightsError, match="numpy.ma.core._mareconstruct.*refused"):
        safe_pickle.loads(pickle.dumps(np.ma.masked_array([1.0, 2.0]), protocol=2))
    rot = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(WeightsError, match="codec 'rot13'"):
        safe_pickle.loads(rot)


def test_truncated_and_corrupt_pickles_are_one_line_errors():
    good = pickle.dumps({"w": np.ones((4, 4), np.float32)}, protocol=2)
    for bad in (good[: len(good) // 2], b"\x80\x02garbage", good[:-1]):
        with pytest.raises(WeightsError, match="not a readable pickle") as err:
            safe_pickle.loads(bad, origin="w.pkl")
        assert str(err.value).startswith("w.pkl:") and "\n" not in str(err.value)
