#!/usr/bin/env bash
# Encoder (masked-LM) distillation study on SIB-200, reproducible on 2 CPU cores in under 30 minutes.
#
#   bash launch_scripts/encoder_study.sh [--data DIR] [--run-dir runs/encoder_study] [--num-gpus 2]
#        [--teacher-steps 360] [--student-steps 240]
#
# No pretrained multilingual encoder can be downloaded here, so the study makes its own teacher:
#  1. a Unigram tokenizer (8,000 ids) on the 20 SIB-200 train splits and a random XLM-R-shaped
#     6 x 256 masked LM (tools/init_encoder.py);
#  2. binarize train/dev/test of every language with it;
#  3. teacher: masked-LM training from scratch on all 20 languages (recipe mlm-scratch, teacher.mode none);
#  4. student: 3 of the teacher's 6 layers (every:2), distilled DistilBERT-style (recipe distilbert);
#  5. baseline: the same student, same init, same tokens and mask stream, teacher.mode none;
#  6. masked-token accuracy and MLM loss on the test split of 6 languages, fixed seeded mask.
set -euo pipefail
cd "$(dirname "$0")/.."
data=../shared/data/sib200
run_dir=runs/encoder_study
num_gpus=2
teacher_steps=360
student_steps=240
while [ $# -gt 0 ]; do
  case "$1" in
    --data) data=$2; shift 2 ;;
    --run-dir) run_dir=$2; shift 2 ;;
    --num-gpus) num_gpus=$2; shift 2 ;;
    --teacher-steps) teacher_steps=$2; shift 2 ;;
    --student-steps) student_steps=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "encoder_study: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -f "$data/hin_Deva/train.tsv" ] || { echo "encoder_study: $data/hin_Deva/train.tsv not found: pass --data DIR (SIB-200 layout)" >&2; exit 2; }
MEGADISTILL_EXTRAS=demo,dev source launch_scripts/env.sh
start=$(date +%s)
langs="hin_Deva ben_Beng tam_Taml asm_Beng ory_Orya sat_Olck"
ds_config=ds_configs/cpu_zero3.json
if command -v nvidia-smi >/dev/null 2>&1 && python -c "import torch,sys; sys.exit(not torch.cuda.is_available())"; then
  ds_config=ds_configs/zero3.json
fi
launch() { deepspeed --num_gpus "$num_gpus" --master_port $((29500 + RANDOM % 1000)) megadistill/train.py --ds_config "$ds_config" "$@"; }

echo "== 1/6 tokenizer + random 6x256 XLM-R-shaped encoder"
[ -f "$run_dir/init/config.json" ] || python tools/init_encoder.py --input "$data"/*/train.tsv --vocab-size 8000 \
  --layers 6 --hidden 256 --heads 4 --intermediate 1024 --output "$run_dir/init"

echo "== 2/6 binarize train/dev/test of every language"
for split in train dev test; do
  [ -f "$run_dir/data/$split/hin_Deva.json" ] || python tools/binarize.py --input "$data"/*/$split.tsv \
    --tokenizer "$run_dir/init" --output-dir "$run_dir/data/$split" > /dev/null
done
train=$(ls "$run_dir"/data/train/*.bin | sed 's/\.bin$//' | paste -sd, -)
valid=$(for l in $langs; do echo "$run_dir/data/dev/$l"; done | paste -sd, -)
common=("data.train_prefixes=[$train]" "data.valid_prefixes=[$valid]" data.seq_len_tokens=128 train.micro_batch_size=16
        train.grad_accum_steps=1 train.eval_max_batches=4 train.seed=1234)

echo "== 3/6 teacher: masked LM from scratch on 20 languages ($teacher_steps steps)"
launch --config megadistill/recipes/mlm-scratch.yaml run_dir="$run_dir/teacher" teacher.path="$run_dir/init" \
  "${common[@]}" train.max_steps="$teacher_steps" train.eval_every_steps=60 train.save_every_steps=0

student=("${common[@]}" teacher.path="$run_dir/teacher/hf" student.layer_map=every:2 student.trim_vocab=false
         train.max_steps="$student_steps" train.eval_every_steps=60 train.save_every_steps=0
         optim.lr=1e-3 optim.warmup_steps=30 optim.min_lr_ratio=0.05)
echo "== 4/6 student: 3 teacher layers, DistilBERT loss ($student_steps steps)"
launch --config megadistill/recipes/distilbert.yaml run_dir="$run_dir/distilled" "${student[@]}"
echo "== 5/6 baseline: the same student without a teacher"
launch --config megadistill/recipes/distilbert.yaml run_dir="$run_dir/no_teacher" "${student[@]}" teacher.mode=none \
  features.hidden_weight=0

echo "== 6/6 masked-token accuracy on the test split"
lang_args=(); for l in $langs; do lang_args+=(--lang "$l"); done
python tools/evaluate.py --data-dir "$data" --split test "${lang_args[@]}" --batch-size 16 \
  --model teacher="$run_dir/teacher/hf" --model distilled="$run_dir/distilled/hf" --model no_teacher="$run_dir/no_teacher/hf" \
  --output "$run_dir/eval.json"
echo "encoder study finished in $(( $(date +%s) - start )) s; results: $run_dir/eval.json"
