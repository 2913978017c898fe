#!/usr/bin/env bash
# What an install costs a new user: bash scripts/measure_install.sh PYTHON VENV REQUIREMENTS_FILE
# makes a fresh virtual environment VENV with PYTHON, installs REQUIREMENTS_FILE from the package index
# alone (no pip configuration of this machine, no local wheels, no cache) and prints one JSON line:
# the install's seconds, the venv's size and how many torch/triton/nvidia-* packages it holds.
set -uo pipefail
py=$1 venv=$(realpath -m "$2") req=$3
rm -rf "$venv"
unset PIP_FIND_LINKS
export PIP_CONFIG_FILE=/dev/null PIP_NO_CACHE_DIR=1
"$py" -m venv "$venv"
start=$(date +%s.%N)
"$venv/bin/python" -m pip install --quiet --upgrade pip
( cd "$(dirname "$0")/.." && "$venv/bin/pip" install --quiet -r "$req" )
rc=$?
end=$(date +%s.%N)
size=$(du -sm "$venv" | cut -f1)
echo "{\"python\": \"$("$venv/bin/python" -V)\", \"req\": \"$req\", \"rc\": $rc, \"install_s\": $(echo "$end - $start" | bc), \"venv_mb\": $size, \"torch_like\": \"$("$venv/bin/pip" list 2>/dev/null | grep -ciE '^(torch|triton|nvidia)')\"}"
