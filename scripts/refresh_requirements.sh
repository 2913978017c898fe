#!/usr/bin/env bash
# Regenerate requirements.txt (every package pinned, transitive ones included) from requirements.in.
# Run it in the environment the test suite passes in, then run `pytest tests/` on a fresh venv.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet pip-tools
pip-compile --quiet --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
  --output-file=requirements.txt requirements.in
# Portable spellings: this checkout as `-e .`, and torch without the local "+cpu" label of the
# CPU wheel it resolved to here (==2.13.0 matches that wheel, and the plain one elsewhere).
sed -i -e 's#^-e file://.*#-e .#' -e 's#^\(torch==[0-9.]*\)+[a-z0-9]*#\1#' requirements.txt
