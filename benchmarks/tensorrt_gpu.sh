#!/usr/bin/env bash
# End to end on a machine with an NVIDIA GPU and TensorRT 10.14+ (pip install 'utrexport[tensorrt,export]'), or
# 10.0+ with ATTENTION=plain: build a bundle with every precision, build its TensorRT engines, verify them against
# the PyTorch reference fixtures, and benchmark TensorRT against PyTorch CUDA on the same GPU.
# Results: OUT.md / OUT.json / OUT-verify.txt / OUT-engines.json (each engine's ONNX file, TF32 setting, profiles, memory).
#   usage: [ATTENTION=fused|plain] benchmarks/tensorrt_gpu.sh [BUNDLE] [OUT]
set -euo pipefail
ATTENTION=${ATTENTION:-fused}
BUNDLE=${1:-bundles/utrbert-6mer-gpu-$ATTENTION}
OUT=${2:-docs/benchmarks-gpu-$ATTENTION}
mkdir -p "$(dirname "$OUT")"
[ -d "$BUNDLE" ] || utrexport build --kmer 6 --random-init --precision fp32,fp16,int8 --attention "$ATTENTION" -o "$BUNDLE"
for precision in fp16 int8; do
  utrexport engine "$BUNDLE" --precision "$precision"
done
# What each engine was built with: the ONNX file (int8: model.int8-fp16.onnx, fp16 float parts), TF32 (off unless
# `utrexport engine --tf32`), profiles and their device memory.
python -c "import json, sys, utr_runtime; json.dump({p: {k: r[k] for k in ('onnx', 'tf32', 'profiles', 'profile_memory_bytes', 'tensorrt', 'gpu')} for p, r in utr_runtime.Bundle(sys.argv[1]).engines.items()}, open(sys.argv[2], 'w'), indent=1)" "$BUNDLE" "$OUT-engines.json"
cat "$OUT-engines.json"
utrexport verify "$BUNDLE" --device tensorrt | tee "$OUT-verify.txt"
utrexport bench "$BUNDLE" --device tensorrt --shapes 1x128,1x512,8x128,32x512 --repeats 20 --out "$OUT"
