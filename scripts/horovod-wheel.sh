#!/bin/sh
# Install the [horovod] extra (horovod built for MXNet + Gloo, CPU) into a venv, compiling it at
# most once per machine: horovod has no binary wheels, and its C++ build takes ~6 minutes on 2 cores.
#
#   scripts/horovod-wheel.sh [PYTHON]        (default .venv/bin/python; `make test` calls it)
#
# The built wheel is kept in $BBADAPT_WHEEL_CACHE (default ~/.cache/bbadapt/wheels) under a key
# made of everything the binary depends on: the horovod version (read from pyproject.toml's
# [horovod] extra), the Python version and the MXNet distribution and version it was compiled
# against (mxnet or mxnet-cu112). A later setup on the same machine installs that wheel in seconds.
# Needs cmake >= 3.13 and g++ (the system's, e.g. Debian cmake 3.25 / g++ 12); pip's cmake is
# installed into the venv when there is none.
set -eu

PY=${1:-.venv/bin/python}
HERE=$(cd "$(dirname "$0")/.." && pwd)
HVD=$(sed -n 's/.*"horovod==\([0-9][0-9.]*\)".*/\1/p' "$HERE/pyproject.toml" | head -n 1)
[ -n "$HVD" ] || { echo "horovod-wheel: no horovod==VERSION in $HERE/pyproject.toml" >&2; exit 1; }

KEY=$("$PY" - <<'EOF'
import importlib.metadata as md, sys
dists = []
for d in ("mxnet", "mxnet-cu112"):
    try:
        dists.append(f"{d}{md.version(d)}")
    except md.PackageNotFoundError:
        pass
if len(dists) != 1:
    sys.exit(f"horovod-wheel: need exactly one of mxnet / mxnet-cu112 installed, found {dists or 'none'}")
print(f"py{sys.version_info[0]}{sys.version_info[1]}-{dists[0]}")
EOF
)
CACHE=${BBADAPT_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bbadapt/wheels}/horovod-$HVD-$KEY

installed() {  # the right horovod, importable with its MXNet extension and Gloo
    "$PY" -c "
import importlib.metadata as md, sys
if md.version('horovod') != '$HVD': sys.exit(1)
import horovod.mxnet as hvd
sys.exit(0 if hvd.gloo_built() else 1)" >/dev/null 2>&1
}

if installed; then
    echo "horovod-wheel: horovod $HVD (MXNet, Gloo) already installed"
    exit 0
fi

if ! ls "$CACHE"/horovod-"$HVD"-*.whl >/dev/null 2>&1; then
    echo "horovod-wheel: building horovod $HVD for $KEY into $CACHE (once per machine; ~6 min on 2 cores)"
    BIN=$(dirname "$PY")
    "$PY" -m pip install -q wheel setuptools
    command -v cmake >/dev/null 2>&1 || "$PY" -m pip install -q cmake
    mkdir -p "$(dirname "$CACHE")"
    STAGE=$(mktemp -d "$CACHE.partial-XXXXXX")
    trap 'rm -rf "$STAGE"' EXIT
    PATH="$BIN:$PATH" MAKEFLAGS=${MAKEFLAGS:--j$(nproc)} \
    HOROVOD_WITH_MXNET=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 \
    HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_GPU_OPERATIONS= \
        "$PY" -m pip wheel -q --no-build-isolation --no-deps --no-binary horovod -w "$STAGE" "horovod==$HVD"
    # a rename: a concurrent or interrupted setup never sees half a cache entry
    mv -T "$STAGE" "$CACHE" 2>/dev/null || echo "horovod-wheel: another setup filled $CACHE first; using it"
    rm -rf "$STAGE"
fi

"$PY" -m pip install -q "$(ls "$CACHE"/horovod-"$HVD"-*.whl | head -n 1)"
installed || { echo "horovod-wheel: horovod $HVD installed from $CACHE but horovod.mxnet (Gloo) does not load" >&2; exit 1; }
echo "horovod-wheel: horovod $HVD installed from $CACHE"
