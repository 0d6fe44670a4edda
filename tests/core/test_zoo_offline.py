"""Pretrained weights without a network: one line naming the host that was tried, and no empty
model cache (or lock file) left behind. The model store is pointed at a local port where nothing
listens ($MXNET_GLUON_REPO, which mxnet's and gluoncv's stores both read): a real refused connection."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from bbadapt.platform.download import DEFAULT_REPO, repo_url


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def convert_offline(model: str, home, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MXNET_HOME": str(home), "MXNET_GLUON_REPO": f"http://127.0.0.1:{closed_port()}/"}
    return subprocess.run([sys.executable, "-m", "bbadapt.cli", "convert", model, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env)


@pytest.mark.parametrize("model", ["resnet50_v2", "resnet18_v1b"], ids=["mxnet-zoo", "gluoncv-zoo"])
def test_offline_pretrained_is_one_line_naming_the_host_and_leaves_no_cache_dirs(model, tmp_path):
    home = tmp_path / "mxnet-home"
    result = convert_offline(model, home, tmp_path)
    assert result.returncode == 1
    errors = [ln for ln in result.stderr.splitlines() if not ln.startswith("... ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors[0].startswith("bbadapt: error: could not download http://127.0.0.1:")  # the URL names the host
    assert "refused" in errors[0] and "--weights random" in errors[0]
    assert not home.exists()  # neither MXNET_HOME nor MXNET_HOME/models was left behind, empty
    assert not (tmp_path / "out").exists()


def test_an_existing_cache_is_left_as_it_was(tmp_path):
    home = tmp_path / "mxnet-home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "other-1234.params").write_bytes(b"someone else's weights")
    result = convert_offline("resnet18_v1b", home, tmp_path)
    assert result.returncode == 1
    assert sorted(p.name for p in (home / "models").iterdir()) == ["other-1234.params"]  # no .lock, no partial zip


def test_the_default_host_is_the_model_stores_own(monkeypatch):
    monkeypatch.delenv("MXNET_GLUON_REPO", raising=False)
    assert repo_url() == DEFAULT_REPO
    from gluoncv.model_zoo import model_store as gluoncv_store
    from mxnet.gluon.model_zoo import model_store as mxnet_store

    assert DEFAULT_REPO.rstrip("/") == mxnet_store.apache_repo_url.rstrip("/") == gluoncv_store.apache_repo_url.rstrip("/")
