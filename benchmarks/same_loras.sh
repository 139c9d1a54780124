#!/usr/bin/env bash
# Usage: bash benchmarks/same_loras.sh OUT  (before and after a change, into two folders; then compare their
# pytorch_lora_weights.safetensors bit for bit). Short tiny runs: the three objectives in both spaces, fp32 and
# bf16, tiny-sdxl and tiny-sd3, spo.py in both spaces. A change meant to be a refactor must leave every LoRA equal.
set -u
mkdir -p "$1"
R=$(realpath "$1"); cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
F="--data synthetic --num-workers 0 --optimizer adamw --global-batch-size 4 --micro-batch-size 2 --log-every 1 --save-every 100 --max-steps 3"
run() { name=$1; shift; python "$@" --output-dir $R/$name > $R/$name.log 2>&1 || echo "FAIL $name"; }
for obj in dpo cpo sft; do for space in ncp latent; do for prec in fp32 bf16; do
  run tiny-$obj-$space-$prec ncp_$obj.py --model tiny --space $space --precision $prec $F
done; done; done
for obj in dpo cpo sft; do run sdxl-$obj-ncp-bf16 ncp_$obj.py --model tiny-sdxl --space ncp --precision bf16 $F; done
run sdxl-dpo-latent-fp32 ncp_dpo.py --model tiny-sdxl --space latent --precision fp32 $F
for obj in dpo cpo sft; do run sd3-$obj-ncp-bf16 ncp_$obj.py --model tiny-sd3 --space ncp --precision bf16 $F; done
run sd3-dpo-ncp-fp32 ncp_dpo.py --model tiny-sd3 --space ncp --precision fp32 $F
run sd3-dpo-latent-bf16 ncp_dpo.py --model tiny-sd3 --space latent --precision bf16 $F
S="--preference-model tiny --log-every 1 --save-every 1000 --epochs 1 --max-steps 2"
for space in ncp latent; do for prec in bf16 fp32; do
  run spo-$space-$prec spo.py --model tiny --space $space --precision $prec $S
done; done
echo done
