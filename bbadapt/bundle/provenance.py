"""Where the original weights of a bundle are now: the files its manifest names, or the ones the
user points at (``bbadapt check DIR --weights PATH``), each verified by sha256 against the manifest.

A re-check rebuilds the original network from the very files that were converted; files that
moved are fine, files that changed are not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from bbadapt.core.weights import sha256_of
from bbadapt.platform.errors import OptionError, WeightsError


def recorded_files(prov: dict) -> dict[str, Optional[str]]:
    """{path at conversion: sha256} of a file provenance (older manifests name one file)."""
    return dict(prov.get("files") or {prov["path"]: prov.get("sha256")})


def locate_weights(prov: dict, weights: Optional[str] = None) -> dict[str, Path]:
    """{path at conversion: path now} for every file the conversion read, each checked by sha256.

    ``weights`` is where the main file (the one given to ``convert --weights``) is now; the
    other files it came with (a ``-symbol.json``'s ``.params``) are looked for beside it,
    under their recorded names.
    """
    if prov.get("kind") != "file":
        if weights:
            raise OptionError(f"--weights is for bundles converted from a weights file; this one used "
                              f"{prov.get('kind', 'pretrained')} weights, which are made again")
        return {}
    if not isinstance(prov.get("path"), str):
        raise WeightsError("the manifest's weights provenance names no file")
    main = prov["path"]
    files = recorded_files(prov)
    if weights is None:
        where = {path: Path(path) for path in files}
    else:
        given = Path(weights).resolve()
        where = {path: given if path == main else given.parent / Path(path).name for path in files}
    for path, digest in files.items():
        now = where[path]
        if not now.is_file():
            if weights is None:
                raise WeightsError(f"the original weights {path} are gone; if they moved, point at them with "
                                   f"`bbadapt check DIR --weights PATH` (verified by sha256)")
            raise WeightsError(f"{now} does not exist (the conversion also read {Path(path).name}, "
                               f"looked for beside {weights})")
        got = sha256_of(now)
        if digest and got != digest:
            which = "changed since the conversion" if weights is None else "is not the file that was converted"
            raise WeightsError(f"{now} {which}: sha256 {got[:16]}... differs from the manifest's {digest[:16]}... "
                               f"(recorded as {path})")
    return where
