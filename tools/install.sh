#!/usr/bin/env bash
# Set up (or check) the poolformer-mm environment: a virtual environment with the official
# OpenMMLab stack (torch, mmengine, mmcv, mmdet, mmsegmentation) and this package in editable mode.
#
#   VENV=.venv                 where the environment lives (created when missing)
#   PYTHON=python3             interpreter used to create it
#   MMCV_WHEELHOUSE=DIR        optional folder holding a prebuilt mmcv 2.1.0 wheel; it is passed as
#                              --find-links to the mmcv step only (a global PIP_FIND_LINKS would
#                              replace pip's own find-links and can pull a multi-GB CUDA torch).
#
# A second run with everything present only checks versions and takes seconds.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$here/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[install] creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
py="$(cd "$VENV" && pwd)/bin/python"  # absolute: some checks run from another folder
pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

# True when the installed distribution $1 satisfies the requirement specifier $2 (e.g. '>=2.6,<2.14').
have() {
    "$py" - "$1" "$2" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
except ImportError:
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.version import Version
try:
    installed = Version(version(sys.argv[1]))
except PackageNotFoundError:
    sys.exit(1)
spec = SpecifierSet(sys.argv[2])
spec.prereleases = True
sys.exit(0 if installed in spec else 1)
PY
}

req="$here/requirements"
# The specifier of package $1 in requirements/runtime.txt (e.g. '>=2.6,<2.14').
spec() { sed -n "s/^$1\([<>=!~][^ #]*\).*/\1/p" "$req/runtime.txt"; }
# Installs keep to the tested versions of requirements/tested.txt.
pip_tested() { pip_install -c "$req/tested.txt" "$@"; }

# Keep a compatible torch if present: reinstalling it is slow, and pip could pick a CUDA build.
if have torch "$(spec torch)"; then
    echo "[install] torch $("$py" -c 'import torch; print(torch.__version__)') already present"
else
    echo "[install] installing torch ($(grep '^torch==' "$req/tested.txt"))"
    pip_tested torch
fi

# mmcv is built against the installed torch, so its build needs torch, setuptools<82 (its
# setup.py imports pkg_resources), wheel and ninja in the environment first.
have setuptools "$(spec setuptools)" && have wheel '>=0' && have ninja '>=0' \
    || pip_install "setuptools$(spec setuptools)" wheel ninja

if have mmcv "$(spec mmcv)" && "$py" -c 'import mmcv.ops' 2>/dev/null; then
    echo "[install] mmcv $("$py" -c 'import mmcv; print(mmcv.__version__)') (with ops) already present"
else
    find_links=()
    if [ -n "${MMCV_WHEELHOUSE:-}" ] && [ -d "$MMCV_WHEELHOUSE" ]; then
        echo "[install] mmcv: looking for a prebuilt wheel in $MMCV_WHEELHOUSE"
        find_links=(--find-links "$MMCV_WHEELHOUSE")
    else
        echo "[install] mmcv: no prebuilt wheel given (MMCV_WHEELHOUSE); pip uses its cache or"
        echo "[install] builds ~77 C++ files from source: 20-40 min on 2 cores. It is not hung."
    fi
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" pip_tested --no-build-isolation "${find_links[@]}" \
        "mmcv$(spec mmcv)"
fi

# Everything else: run time, the test suite and linter, the analysis tools, ONNX export and
# ONNX Runtime (the deploy tests need them). Already satisfied requirements cost pip a second or
# two and no download.
echo "[install] checking requirements/{runtime,tests,analysis,deploy}.txt"
pip_tested -r "$req/runtime.txt" -r "$req/tests.txt" -r "$req/analysis.txt" -r "$req/deploy.txt"

if ! (cd / && "$py" -c "import sys, poolformer_mm; sys.exit(not poolformer_mm.__file__.startswith('$here/'))") 2>/dev/null; then
    echo "[install] installing poolformer_mm (editable)"
    pip_install --no-build-isolation --no-deps -e "$here"
fi
echo "[install] environment ready: $VENV"
