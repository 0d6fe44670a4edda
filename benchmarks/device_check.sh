#!/usr/bin/env bash
# What anyone with one GPU runs (issue 20, item 8): no network, from the repository alone, <= 8 min on one H100.
#
#   bash benchmarks/device_check.sh                 # on a CUDA machine: resnet50_v1b C4 + FPN, default sizes
#   bash benchmarks/device_check.sh --cpu --smoke   # anywhere (make test): resnet18_v1b, small images, few iterations
#
# Needs python with torch >= 2.4, torchvision >= 0.19, numpy, typer, rich, pillow (the device image's; no mxnet,
# no pycocotools: the evaluation is VOC07). PYTHON=... picks the interpreter (default: python3).
# Steps, each one record in one table at the end; the exit status is 1 if any step failed:
#   1. bbadapt doctor (recorded: what this environment runs);
#   2. build the exported C4 and FPN detectors from benchmarks/device_check/*.json with seeded weights
#      (an exported ResNet-50 detector is too large to carry; export itself needs MXNet);
#   3. bbadapt train EXPORT on tests/data/raccoon_voc, 30 iterations (one epoch of its 30 training photos,
#      one image per step) in float32 and with --amp, at the default sizes (smoke: 1 photo, short side 128,
#      16 sampled RoIs: device_check.py shrink_for_smoke);
#      this is the torch engine's `bbadapt train`: without it the step fails, saying so;
#   4. bbadapt evaluate of the trained checkpoint (VOC07 mAP: the device has no pycocotools);
#   5. train step and inference timed with the backbone BN as eval-mode BatchNorm2d, FrozenBatchNorm2d, fused;
#      peak GPU memory, images/s;
#   6. on an Ampere/Ada GPU (sm_80/86/89) with mxnet installed ([gpu]): benchmarks/gpu_check.py (the MXNet path).
set -u -o pipefail

CPU=0 SMOKE=0
for arg in "$@"; do
    case "$arg" in
        --cpu) CPU=1 ;;
        --smoke) SMOKE=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "device_check.sh: unknown argument $arg (use --cpu, --smoke)" >&2; exit 2 ;;
    esac
done

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="${DEVICE_CHECK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX")}"
mkdir -p "$WORK"
RESULTS="$WORK/results.jsonl"
: > "$RESULTS"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
FLAGS=()
[ "$CPU" = 1 ] && FLAGS+=(--cpu)
[ "$SMOKE" = 1 ] && FLAGS+=(--smoke)
DEVICE=(--gpus 0)
[ "$CPU" = 1 ] && DEVICE=(--cpu)
echo "device_check: work directory $WORK"

record() {  # record STEP PASSED(0/1) SECONDS NOTE
    "$PYTHON" - "$RESULTS" "$1" "$2" "$3" "$4" <<'EOF'
import json, sys
path, step, ok, seconds, note = sys.argv[1:]
with open(path, "a") as f:
    f.write(json.dumps({"step": step, "passed": ok == "1", "seconds": float(seconds), "note": note[:160]}) + "\n")
EOF
}

run_step() {  # run_step NAME COMMAND...: run, record pass/fail, time and the last output line
    local name="$1"; shift
    local log="$WORK/$(echo "$name" | tr ' /:' '___').log"
    local t0; t0=$(date +%s.%N)
    echo "== $name: $*"
    "$@" > "$log" 2>&1
    local code=$?
    local t1; t1=$(date +%s.%N)
    local last; last=$(grep -v '^\s*$' "$log" | tail -n 1)
    tail -n 5 "$log"
    record "$name" "$([ $code = 0 ] && echo 1 || echo 0)" "$(awk "BEGIN{print $t1 - $t0}")" "${last:-exit $code}"
    return $code
}

# 1. doctor: records what runs here (exit 0 when either engine runs; here the torch engine must).
t0=$(date +%s.%N)
"$PYTHON" -m bbadapt.cli doctor --json > "$WORK/doctor.json" 2> "$WORK/doctor.err"
code=$?
if "$PYTHON" -c "import json,sys; json.load(open(sys.argv[1]))" "$WORK/doctor.json" 2>/dev/null; then
    read -r ok note < <("$PYTHON" -c "
import json, sys
r = json.load(open(sys.argv[1])); t = r['torch']
gpus = ', '.join(g['name'] + (' runs' if g['runs'] else ' FAILS') for g in t.get('gpus', [])) or 'no CUDA GPU'
print(1 if r['torch_ok'] else 0, ('mxnet runs' if r['cpu_ok'] else 'no usable mxnet') + '; torch '
      + ('NO: ' + t['error'] if t.get('error') else t['torch'] + ': ' + gpus))
" "$WORK/doctor.json")
    record "doctor" "$ok" "$(awk "BEGIN{print $(date +%s.%N) - $t0}")" "$note (exit $code)"
else
    record "doctor" 0 "$(awk "BEGIN{print $(date +%s.%N) - $t0}")" "$(tail -n 1 "$WORK/doctor.err")"
fi

# 2. the exported detectors, seeded
run_step "build" "$PYTHON" "$REPO/benchmarks/device_check.py" build "$WORK/exports" "${FLAGS[@]}"
BUILT=$?

# 3-4. train (float32, AMP) and evaluate through the CLI: the torch engine's `bbadapt train` on an export
VOC="$WORK/voc"
if [ "$SMOKE" = 1 ]; then
    mkdir -p "$VOC/VOC2017/ImageSets/Main"
    cp -r "$REPO/tests/data/raccoon_voc/VOC2017/JPEGImages" "$REPO/tests/data/raccoon_voc/VOC2017/Annotations" "$VOC/VOC2017/"
    # one photo each: bfloat16 autocast on a CPU without native bf16 (AVX512-BF16/AMX) runs oneDNN's slow
    # path, and the smoke only proves each step runs end to end (measured: 5 min for 2 photos, C4, busy 2 cores)
    head -n 1 "$REPO/tests/data/raccoon_voc/VOC2017/ImageSets/Main/train.txt" > "$VOC/VOC2017/ImageSets/Main/train.txt"
    head -n 1 "$REPO/tests/data/raccoon_voc/VOC2017/ImageSets/Main/val.txt" > "$VOC/VOC2017/ImageSets/Main/val.txt"
    SIZES=(--short-side 128 --max-size 192)
else
    VOC="$REPO/tests/data/raccoon_voc"
    SIZES=()
fi
if ! "$PYTHON" -c "import bbadapt.engines.torch" 2>/dev/null; then
    echo "device_check: bbadapt.engines.torch is not in this checkout: \`bbadapt train\` of a torchvision export" \
         "cannot run; the train/evaluate steps below will fail" >&2
fi
for layout in c4 fpn; do
    for precision in fp32 amp; do
        dir="$WORK/train-$layout-$precision"
        amp=()
        [ "$precision" = amp ] && amp=(--amp)
        if [ "$BUILT" = 0 ]; then
            cp -r "$WORK/exports/$layout" "$dir"
            run_step "train $layout $precision" "$PYTHON" -m bbadapt.cli train "$dir" --dataset "voc:$VOC" --epochs 1 \
                --batch-size 1 --val-interval 1 --log-interval 10 "${amp[@]}" "${SIZES[@]}" "${DEVICE[@]}" \
                && run_step "evaluate $layout $precision" "$PYTHON" -m bbadapt.cli evaluate "$dir/checkpoints/last" \
                    --dataset "voc:$VOC" --metric voc07 "${DEVICE[@]}"
        else
            record "train $layout $precision" 0 0 "not run: the build step failed"
        fi
    done
done

# 5. BN forms timed
if [ "$BUILT" = 0 ]; then
    run_step "bench" "$PYTHON" "$REPO/benchmarks/device_check.py" bench "$WORK/exports" "${FLAGS[@]}" --results "$RESULTS.bench"
    [ -f "$RESULTS.bench" ] && cat "$RESULTS.bench" >> "$RESULTS"
fi

# 6. the MXNet path, where it can run: Ampere/Ada and mxnet-cu112 installed
if [ "$CPU" = 0 ]; then
    cc=$("$PYTHON" -c "import torch; print('%d%d' % torch.cuda.get_device_capability(0))" 2>/dev/null || echo 0)
    if [ "$cc" -ge 80 ] && [ "$cc" -le 89 ] && "$PYTHON" -c "import mxnet" 2>/dev/null; then
        run_step "gpu_check.py (MXNet)" "$PYTHON" "$REPO/benchmarks/gpu_check.py"
    else
        record "gpu_check.py (MXNet)" 1 0 "skipped: sm_$cc or no mxnet (MXNet 1.9.1 runs sm_50..86 only; docs/gpu.md)"
    fi
fi

echo
"$PYTHON" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() and not $CPU else 'cpu')" 2>/dev/null
"$PYTHON" "$REPO/benchmarks/device_check.py" table "$RESULTS"
