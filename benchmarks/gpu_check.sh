#!/usr/bin/env bash
# The GPU checks of issue 11 as one run (about 8 minutes on an H200): kernel counts and host time on CUDA,
# a full-size SDXL UNet training step in bf16 at 1024 px (time, then peak memory) with the fused layer, the
# plan kernels and the timed choice against PEFT LoRA r1 and PEFT WaveFT, and the device tests.
#
#   bash benchmarks/gpu_check.sh            # python3 with CUDA torch, diffusers, peft, PyWavelets, safetensors
#
# Where diffusers or PyWavelets are missing (a bare GPU image), carry wheels in an ignored .whl/ folder and put
# `python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site`
# before this script. Every step runs even if one before it failed; the output is what to report.
set -u
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
echo "== op_count (cuda)"
timeout 120 $py benchmarks/op_count.py --device cuda --repeats 300
for kernels in auto fused sparse; do
  echo "== train_unet bf16 1024 px, WAVEFT_KERNELS=$kernels"
  WAVEFT_KERNELS=$kernels timeout 150 $py benchmarks/train_unet.py --device cuda --dtype bf16 --resolution 1024 --repeats 5
done
echo "== train_unet bf16 1024 px, peak memory (auto)"
timeout 150 $py benchmarks/train_unet.py --device cuda --dtype bf16 --resolution 1024 --memory
echo "== device tests"
WAVEFT_TEST_DEVICE=cuda timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_device.py
