#!/usr/bin/env bash
# Train the FRED RGB + Event detector with Accelerate (one or many GPUs, or the CPU); flags go to the trainer:
#   bash start_training_fusion.sh --fred-root /data/FRED --modality dual
set -euo pipefail
cd "$(dirname "$0")"
exec accelerate launch train_fred_fusion.py "$@"
