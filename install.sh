#!/usr/bin/env bash
# Install everything composer_ext needs on Debian/Ubuntu with Python 3.11:
#   1. the Debian packages that carry the embedded demo data (skipped when already installed),
#   2. a virtual environment in .venv,
#   3. composer_ext with its test and llmfoundry extras (PyPI: Composer, Streaming, transformers, peft, llm-foundry
#      0.22, ...), so the default test command also runs the llm-foundry tests.
# Run it from anywhere; it works in the repository it lives in. Set PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")"

DEB_PACKAGES="bible-kjv fortunes pari-doc debian-policy gnu-standards debian-reference-en dataset-fashion-mnist"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=""
for package in $DEB_PACKAGES; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing="$missing $package"
done
if [ -n "$missing" ]; then
  echo "install.sh: apt-get install$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv
fi
"$PYTHON" -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test,llmfoundry]"
echo "install.sh: done ($(.venv/bin/python --version), composer-ext in .venv/bin)"
