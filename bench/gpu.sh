#!/usr/bin/env bash
# VOLO-D1 and VOLO-D3 bfloat16 train step on one GPU, JAX vs timm under torch.autocast(bfloat16), eager and
# torch.compile, timed in alternation: images/s, the JAX/PyTorch ratio and MFU against the measured bf16 matmul
# peak. Needs jax[cuda], flax, optax, ml_collections, torch and timm installed (requirements*.txt); ~5 min.
#
#   bash bench/gpu.sh [OUT_DIR]     # tables on stdout, JSON per model in OUT_DIR (default bench_gpu/)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench_gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())"
common=(--img-size 224 --dtype bfloat16 --mode train --compare-torch --runs 10 --warmup 3)
timeout 300 python3 -m volo_jax.bench --model volo_d1 --batch 128 "${common[@]}" --json "$out/volo_d1.json"
timeout 300 python3 -m volo_jax.bench --model volo_d3 --batch 64 "${common[@]}" --json "$out/volo_d3.json"
