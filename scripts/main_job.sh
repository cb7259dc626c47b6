#!/usr/bin/env bash
# The main job: the paper's headline COCO protocol end to end (30 shots, seed 33, the 20 PASCAL
# VOC classes; the paper reports 36.8 box AP / 34.2 mask AP), with the official checkpoints.
# Missing checkpoints and COCO files are downloaded; offline, it stops at the first missing file
# and says what to download and where to put it. Extra arguments go to `ntt reproduce`
# (e.g. --max-samples 50 for a quick look, --resume after an interruption). The default root is
# not FiftyOne's zoo folder (~/fiftyone/coco-2017), whose layout differs from COCO's own.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/ntt reproduce \
  --coco-root "${COCO_ROOT:-$HOME/coco2017}" \
  --shots 30 --seed 33 --split few_shot_classes \
  "$@"
