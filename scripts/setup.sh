#!/usr/bin/env bash
# Installs everything fedcore needs on a Debian machine and is quick when it
# is all there already (each step checks first). Called by `make demo` and
# `make test`; run it alone with `make setup`.
#
#   apt:   C/C++ toolchain, cmake, clang + libclang (SEAL bindings),
#          libzstd-dev (the shared zstd that tch's zip links beside SEAL's
#          static one), protoc (gRPC code generation), Python venv support,
#          DejaVu fonts (text in the PNG plots of the examples), Chromium +
#          Node.js (the dashboard's browser test), PostgreSQL (the store's
#          tests run against it too)
#   npm:   playwright-core (drives Debian's Chromium; no browser download)
#   .venv: the torch 2.13.0 wheel, whose libtorch the `tch` feature links
#          (CPU works with no GPU present; the CUDA runtime comes from the
#          cuda-toolkit wheel so that libtorch's libraries load); and
#          schemathesis, which checks the dashboard's API against its
#          OpenAPI document (a test tool only: nothing we ship imports it)
#
# `setup.sh --demo` (what `make demo` runs) leaves out what only the tests
# need (Chromium, Node.js and playwright-core, PostgreSQL, schemathesis):
# a newcomer's first `make demo` does not wait for them; `make test`
# installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=0
if [ "${1:-}" = "--demo" ]; then
    DEMO=1
elif [ -n "${1:-}" ]; then
    echo "usage: scripts/setup.sh [--demo]" >&2
    exit 2
fi

TORCH_VERSION=2.13.0
SCHEMATHESIS_VERSION=4.32.5
CUDA_TOOLKIT="cuda-toolkit[cudart,cupti]==13.0.3"
VENV=.venv
APT_PACKAGES=(build-essential make pkg-config cmake clang libclang-dev libzstd-dev protobuf-compiler
              python3 python3-venv ca-certificates fonts-dejavu-core)
if [ "$DEMO" = 0 ]; then
    APT_PACKAGES+=(chromium postgresql)
    # Node.js: Debian's, unless one is already on the PATH (some images ship their own).
    command -v node >/dev/null && command -v npm >/dev/null || APT_PACKAGES+=(nodejs npm)
fi

log() { printf 'setup: %s\n' "$*" >&2; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { log "need root (or sudo) to install: ${missing[*]}"; exit 1; }
        sudo=sudo
    fi
    log "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    log "cargo not found: install Rust 1.89 or newer (https://rustup.rs), then run this again"
    exit 1
fi
rust_minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
if [ "${rust_minor:-0}" -lt 89 ]; then
    log "Rust 1.89 or newer is required, found $(rustc --version)"
    exit 1
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        command -v rustup >/dev/null && rustup component add "$component" || {
            log "cargo $component is missing and rustup is not available"; exit 1; }
    fi
done

# pip install into the venv. torch's own dependency list (triton, nccl, ...)
# is not needed to link libtorch and is skipped; pip's resolver then names it
# after every install, which is expected and filtered out here.
venv_install() {
    local out
    if ! out=$("$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1); then
        printf '%s\n' "$out" >&2
        log "installing $* failed"
        exit 1
    fi
    printf '%s\n' "$out" | grep -v -e "dependency resolver" -e "requires .*, which is not installed" \
        -e "but you have .* which is incompatible" -e '^$' >&2 || true
}

marker="$VENV/.fedcore-torch-$TORCH_VERSION"
if [ ! -f "$marker" ]; then
    log "installing torch==$TORCH_VERSION into $VENV (about 540 MB, once)"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "torch==$TORCH_VERSION"
    venv_install "$CUDA_TOOLKIT"
    # libtorch is all `tch` needs from the wheel (importing torch in Python would
    # need the dependencies skipped above).
    ls "$VENV"/lib/python3*/site-packages/torch/lib/libtorch_cpu.so >/dev/null || {
        log "the torch wheel did not install libtorch_cpu.so"; exit 1; }
    touch "$marker"
fi

[ "$DEMO" = 1 ] && exit 0

marker="$VENV/.fedcore-schemathesis-$SCHEMATHESIS_VERSION"
if [ ! -f "$marker" ]; then
    log "installing schemathesis==$SCHEMATHESIS_VERSION into $VENV (the dashboard's API checks)"
    venv_install "schemathesis==$SCHEMATHESIS_VERSION"
    touch "$marker"
fi

if [ ! -f apps/hospital/e2e/node_modules/playwright-core/package.json ]; then
    log "installing the browser test's playwright-core (npm ci, uses Debian's Chromium)"
    npm ci --prefix apps/hospital/e2e --no-audit --no-fund --loglevel=error >/dev/null
fi
