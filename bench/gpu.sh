#!/usr/bin/env bash
# The accelerator benchmark: the project's pmap'ed train step in bfloat16 compute
# (float32 parameters) at per-device batch 256 and 512, side by side with
# PyTorch (channels_last, bf16 autocast, torch.compile) in the same process.
#
#     bash bench/gpu.sh                 # JSON lines to stdout
#     OUT=/some/dir bash bench/gpu.sh   # and to $OUT/train_step.jsonl
#
# Needs jax[cuda], flax, optax (and torch with CUDA for the comparison). It needs
# neither TensorFlow nor ml_collections: bench/train_step.py imports neither.
# MODEL (torchvision), IMAGE_SIZE (224), STEPS (20), ROUNDS (3) and
# BACKWARD_IMPL (lax,fast: XLA's autodiff first, the hand-written CPU backward
# second, timed in the same run) and DEVICE_AUGMENT (256: the step also timed on
# packed 256x256 images that it crops, flips and colours itself) can be overridden
# from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
MODEL=${MODEL:-torchvision}
IMAGE_SIZE=${IMAGE_SIZE:-224}
STEPS=${STEPS:-20}
ROUNDS=${ROUNDS:-3}
BACKWARD_IMPL=${BACKWARD_IMPL:-lax,fast}
DEVICE_AUGMENT=${DEVICE_AUGMENT:-256}  # also time the step cropping packed 256x256 images itself; 0 = off
DEVICES=$("$PYTHON" -c "import jax; print(jax.local_device_count())")
COMPARE=()
if "$PYTHON" -c "import torch" 2>/dev/null; then
  COMPARE=(--compare_torch --torch_channels_last --torch_compile)
fi
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
fi
for PER_DEVICE in 256 512; do
  LINE=$("$PYTHON" bench/train_step.py --model="$MODEL" --image_size="$IMAGE_SIZE" \
    --batch_size=$((PER_DEVICE * DEVICES)) --dtype=bfloat16 --steps="$STEPS" --rounds="$ROUNDS" \
    --backward_impl="$BACKWARD_IMPL" --device_augment="$DEVICE_AUGMENT" "${COMPARE[@]}" \
    --label="gpu.sh per_device=$PER_DEVICE" | tail -n 1)
  echo "$LINE"
  if [[ -n "${OUT:-}" ]]; then
    echo "$LINE" >>"$OUT/train_step.jsonl"
  fi
done
