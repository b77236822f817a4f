#!/usr/bin/env bash
# CI host stage: the glue against the real hosts whose unmodified snapshots lie in ../shared/hosts (ComfyUI
# 0.3.64 and 0.30.0, each with the frontend it pins and loaded in headless Chromium; A1111 1.10.1). Nothing is
# downloaded from the hosts' projects: the snapshots are unpacked into .hosts/, their Python requirements come
# from the package index into .hostvenv/. Without the snapshots the stage says so and passes.
set -euo pipefail
cd "$(dirname "$0")/.."

snapshots=${WAVEFT_HOST_SNAPSHOTS:-}
if [ -z "$snapshots" ]; then
  for candidate in ../shared/hosts "$(git remote get-url origin 2>/dev/null || echo /nonexistent)/../shared/hosts"; do
    if [ -d "$candidate" ]; then snapshots=$(cd "$candidate" && pwd); break; fi
  done
fi
if [ -z "$snapshots" ] || ! ls "$snapshots"/ComfyUI-*.tar.gz >/dev/null 2>&1; then
  echo "host stage skipped: no host snapshots found (../shared/hosts; or set WAVEFT_HOST_SNAPSHOTS)"
  exit 0
fi

# ComfyUI 0.30 imports torchaudio, so torch, torchvision and torchaudio must match: 2.9.1 has all three as
# wheels that run on the CPU. CI's own venv keeps the CPU build of torch 2.13.
python3 -m venv .hostvenv
pip=".hostvenv/bin/pip"
$pip install -q torch==2.9.1 torchvision==0.24.1
$pip install -q torch==2.9.1 'torchaudio==2.9.*'
rm -rf .hosts && mkdir -p .hosts
declare -A checkouts
for archive in "$snapshots"/ComfyUI-*.tar.gz; do
  version=$(basename "$archive" | cut -d- -f2)
  mkdir -p ".hosts/comfyui-$version" && tar -xzf "$archive" -C ".hosts/comfyui-$version"
  checkout=".hosts/comfyui-$version/ComfyUI"
  checkouts[$version]=$checkout
  # the frontend and templates each version pins go to a folder of their own (PYTHONPATH per run)
  grep -E '^comfyui-(frontend-package|workflow-templates|embedded-docs)==' "$checkout/requirements.txt" > ".hosts/pins-$version.txt"
  $pip install -q --no-deps --target ".hosts/py-$version" -r ".hosts/pins-$version.txt"
  grep -vE '^(torch|torchvision|torchaudio|comfyui-frontend-package|comfyui-workflow-templates|comfyui-embedded-docs)([=<> ]|$)' \
    "$checkout/requirements.txt" > ".hosts/requirements-$version.txt"
  $pip install -q -r ".hosts/requirements-$version.txt" torch==2.9.1
done
grep -v '^torch==' requirements-test.txt > .hosts/requirements-test.txt
$pip install -q -r .hosts/requirements-test.txt torch==2.9.1 playwright
if ! command -v chromium >/dev/null 2>&1; then
  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
    || echo "chromium could not be installed: the page tests will skip with that reason"
fi

status=0
for version in "${!checkouts[@]}"; do
  echo "== ComfyUI $version (${checkouts[$version]})"
  COMFYUI_PATH="$PWD/${checkouts[$version]}" PYTHONPATH="$PWD/.hosts/py-$version" \
    .hostvenv/bin/python -m pytest -q tests/test_comfy_glue.py tests/test_comfy_host.py tests/test_comfy_train.py \
    tests/test_comfy_workflows.py tests/test_comfy_current.py tests/test_comfy_page.py || status=1
done
for archive in "$snapshots"/stable-diffusion-webui-*.tar.gz; do
  [ -e "$archive" ] || continue
  tar -xzf "$archive" -C .hosts
  echo "== $(basename "$archive" .tar.gz)"
  WEBUI_ROOT="$PWD/.hosts/stable-diffusion-webui" .hostvenv/bin/python -m pytest -q tests/test_webui_*.py || status=1
done
exit $status
