#!/usr/bin/env bash
# End to end on a machine with an NVIDIA GPU and TensorRT 10.14+ (pip install 'utrexport[tensorrt,export]'), or
# 10.0+ with ATTENTION=plain: build a bundle with every precision, build its TensorRT engines, verify them against
# the PyTorch reference fixtures, and benchmark TensorRT against PyTorch CUDA on the same GPU.
# Results: OUT.md / OUT.json / OUT-verify.txt.
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
utrexport verify "$BUNDLE" --device tensorrt | tee "$OUT-verify.txt"
utrexport bench "$BUNDLE" --device tensorrt --shapes 1x128,1x512,8x128,32x512 --repeats 20 --out "$OUT"
