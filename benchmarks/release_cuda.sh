#!/usr/bin/env bash
# The release command on a CUDA machine, timed end to end: every stage (synthesis, token cache, report LM,
# series names, CLIP, heads, the evaluations, the scaling curve) of training/configs/release-cuda-check.yaml
# (release-lite's stages on 400 studies, sized for about 8 minutes on one GPU and 16 CPU cores), then the
# built release predicts a bundled example study on the same device. Prints the seconds of every stage,
# the total, the evaluation's headline table and the prediction's top diagnoses.
#
#   bash benchmarks/release_cuda.sh                     # CUDA, the check config, work in runs/release-cuda-check
#   CONFIG=training/configs/release-lite.yaml bash benchmarks/release_cuda.sh    # the shipped release's config
#   DEVICE=cpu CONFIG=my-tiny.yaml WORK=/tmp/check bash benchmarks/release_cuda.sh   # the script itself, no GPU
#
# Needs requirements.txt's packages (gradio aside) and a torch that sees the GPU; PYTHON picks the
# interpreter (default python3). REPORT_DIR, when set, receives stages.json, eval.md and prediction.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CONFIG=${CONFIG:-training/configs/release-cuda-check.yaml}
WORK=${WORK:-runs/release-cuda-check}
DEVICE=${DEVICE:-cuda}
EXAMPLE=${EXAMPLE:-assets/examples/glioma_high_grade.zip}

"$PYTHON" - "$DEVICE" <<'PY'
import sys
from prima.distributed import resolve_device
from training.runtime import machine_description
device = resolve_device(sys.argv[1])  # raises when CUDA is asked for and none is visible
print("machine:", machine_description(device), flush=True)
PY

started=$(date +%s)
"$PYTHON" -m training.release --config "$CONFIG" --device "$DEVICE" --work "$WORK" --out "$WORK/release"
built=$(date +%s)
"$PYTHON" -m prima.cli predict "$EXAMPLE" --weights "$WORK/release" --device "$DEVICE" --top 5 \
    --out "$WORK/prediction.json"
finished=$(date +%s)

echo "== stage seconds ($WORK/stages.json)"
cat "$WORK/stages.json"
echo "== release built in $((built - started)) s, example predicted in $((finished - built)) s" \
     "(total $((finished - started)) s)"
echo "== evaluation ($WORK/release/evaluation/eval.md)"
sed -n '1,20p' "$WORK/release/evaluation/eval.md"
if [[ -n "${REPORT_DIR:-}" ]]; then
    mkdir -p "$REPORT_DIR"
    cp "$WORK/stages.json" "$WORK/release/evaluation/eval.md" "$WORK/prediction.json" "$REPORT_DIR/"
fi
