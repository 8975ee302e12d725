#!/usr/bin/env bash
# The GPU checks in one go, for a machine with a CUDA device and torch + transformers but no
# Ray: the CUDA tests, then the decode bench at two realistic sizes (bf16, batch 1 and 8)
# and the training-step bench (fp32 master weights, bf16 autocast). Logs, and each bench's
# JSON line, go to $OUT (default /tmp/echo-ray-gpu).
#
#     bash bench/gpu_run.sh [tests|decode|train ...]   (default: all three)
set -uo pipefail
out=${OUT:-/tmp/echo-ray-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests decode train)
status=0

bench() {  # name, then the command: full log in $out/name.log, its JSON line in name.json
  local name=$1; shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.log" | grep -v '^{'
  local code=${PIPESTATUS[0]}  # the bench's own exit status (no `set -e`: go on after it)
  [ "$code" -eq 0 ] || { echo "!! $name failed ($code)"; status=1; }
  tail -n 1 "$out/$name.log" | grep '^{' > "$out/$name.json" || true
}

# Qwen2.5-VL-3B's language-model shapes (the vision tower of the preset is the 7B's, as in 3B)
qwen3b=(model.hidden_size=2048 model.num_layers=36 model.num_heads=16 model.num_kv_heads=2
        model.intermediate_size=11008)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, torch.cuda.get_device_name())"
for part in "${parts[@]}"; do
  case $part in
    tests)
      python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/tests.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    decode)
      bench decode_7b python3 bench/decode.py --preset base-7b --repeats 5
      bench decode_3b python3 bench/decode.py --preset base-7b --repeats 5 "${qwen3b[@]}"
      bench decode_tiny python3 bench/decode.py --repeats 5 ;;
    train)
      # 7B widths at 8 of its 28 layers: AdamW over fp32 masters of all 28 needs > 80 GB.
      bench train_step_7b_8layers python3 bench/train_step.py --preset base-7b model.num_layers=8 ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
exit $status
