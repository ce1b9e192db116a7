# Sourced by the Makefile: points the `tch` build and binaries at the libtorch
# inside the project's .venv (see scripts/setup.sh).
_fedcore_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_fedcore_torch="$(ls -d "$_fedcore_root"/.venv/lib/python3*/site-packages/torch 2>/dev/null | head -n 1)"
if [ -n "$_fedcore_torch" ]; then
    export LIBTORCH="$_fedcore_torch"
    export LD_LIBRARY_PATH="$_fedcore_torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
unset _fedcore_root _fedcore_torch
