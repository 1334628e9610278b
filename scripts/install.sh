#!/usr/bin/env bash
# Install glmtune and its pinned dependencies into a Python environment.
# Used by `make setup` and by the Dockerfile, so both install the same way.
#   scripts/install.sh PYTHON [--editable]
# TORCH_SPEC picks the torch build (default: the CPU wheel torch==2.13.0);
# TORCH_INDEX_URL adds a package index for it (e.g. the PyTorch CPU or CUDA index).
set -euo pipefail
python=${1:?usage: install.sh PYTHON [--editable]}
mode=${2:-}
here=$(cd "$(dirname "$0")/.." && pwd)
torch_spec=${TORCH_SPEC:-torch==2.13.0}
index_args=()
[ -n "${TORCH_INDEX_URL:-}" ] && index_args=(--extra-index-url "$TORCH_INDEX_URL")

"$python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# torch first and on its own: left to the resolver, a bare `torch` requirement
# pulls a multi-GB CUDA build even on machines without a GPU.
"$python" -m pip install --quiet "${index_args[@]}" "$torch_spec"
grep -v '^torch==' "$here/requirements.txt" > "${TMPDIR:-/tmp}/glmtune-req.$$"
"$python" -m pip install --quiet -r "${TMPDIR:-/tmp}/glmtune-req.$$"
rm -f "${TMPDIR:-/tmp}/glmtune-req.$$"
# DeepSpeed (--strategy zero2 / zero3; WITH_DEEPSPEED=0 skips it). Its source package
# imports torch while building: built against the torch above, not an isolated
# (unpinned, multi-GB) one. No CUDA ops are compiled at install time.
# Optional: if it cannot be built here, everything else still works and says so.
if [ "${WITH_DEEPSPEED:-1}" != 0 ]; then
  # Python >= 3.12 venvs ship without setuptools, which a build without isolation needs
  if ! { "$python" -m pip install --quiet setuptools wheel &&
         "$python" -m pip install --quiet --no-build-isolation --no-deps deepspeed==0.19.8 &&
         "$python" -m pip install --quiet hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 \
           py-cpuinfo==9.0.0 einops==0.8.2 "pydantic>=2,<3"; }; then
    echo "warning: DeepSpeed was not installed; --strategy zero2 / zero3 will be unavailable" >&2
  fi
fi
if [ "$mode" = "--editable" ]; then
  "$python" -m pip install --quiet --no-deps -e "$here"
else
  "$python" -m pip install --quiet --no-deps "$here"
fi
