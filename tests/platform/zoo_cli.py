"""``python zoo_cli.py ARGS``: the bbadapt CLI as a test mirror of the model zoos needs it.

Two test-only changes, both from environment variables the tests set, and nothing else:

* ``ZOO_CLI_SHA1`` (JSON ``{"mxnet": {name: sha1}, "gluoncv": {...}}``) is merged into the zoos'
  own sha1 tables (``model_store._model_sha1``), so a fixture built in the test (random weights
  in a zip laid out as ``gluon/models/NAME-SHA1[:8].zip``) is what the zoo publishes;
* ``ZOO_CLI_READONLY=DIR`` makes every write under DIR fail with EROFS, as on a read-only
  file system (an audit hook sees every ``open`` for writing, ``mkdir``, rename and remove; a
  chmod would not stop the root user these tests may run as).

mxnet reads ``MXNET_HOME`` when it is imported, hence a fresh process per run.
"""

from __future__ import annotations

import errno
import json
import os
import sys


def _readonly(root: str) -> None:
    root = os.path.realpath(root)
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    mutating = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.chmod", "os.truncate", "os.symlink", "os.link",
                "shutil.rmtree", "os.utime"}

    def inside(path) -> bool:
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(root)
        except (TypeError, ValueError):
            return False

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            wants_write = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (isinstance(flags, int) and flags > 0 and flags & writing)
            if wants_write and inside(path):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        elif event in mutating and args and any(inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(args[0]))

    sys.addaudithook(hook)


def main() -> None:
    tables = json.loads(os.environ.get("ZOO_CLI_SHA1", "{}"))
    if tables.get("mxnet"):
        from mxnet.gluon.model_zoo import model_store

        model_store._model_sha1.update(tables["mxnet"])
    if tables.get("gluoncv"):
        from bbadapt.core.zoo import import_gluoncv

        import_gluoncv()
        from gluoncv.model_zoo import model_store

        model_store._model_sha1.update(tables["gluoncv"])
    if os.environ.get("ZOO_CLI_READONLY"):
        _readonly(os.environ["ZOO_CLI_READONLY"])
    from bbadapt.cli import main as cli

    sys.argv = ["bbadapt", *sys.argv[1:]]
    sys.exit(cli())


if __name__ == "__main__":
    main()
