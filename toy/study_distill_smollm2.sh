#!/usr/bin/env bash
# The cold-student study (README, "The comparisons"): distillation from a separate teacher and the
# sparse-to-dense bridge against GRPO and SFT, fixed before it ran. The student is the raw
# SmolLM2-135M-Instruct (it almost never answers the toy's problems closed-book); the teacher is
# the warmed SmolLM2 of the OPSD study (models/SmolLM2-warm, built by toy/study_opsd_smollm2.sh).
# Every arm trains the student on the same number of completions, 384 (its "student compute"),
# from the same settings (LoRA r 16, lr 1e-4 constant, temperature 0.7, 64 new tokens):
#   grpo          12 steps x 4 problems x 8 samples
#   grpo-garl     the same with GARL's cold-start amplification, --garl-q 0.5
#   sft           24 steps x 16 reference solutions
#   distill       24 steps x 16 student samples, forward KL to the teacher on the student's prompt
#   bridge        the same, the first 8 steps on the teacher's samples (forward KL, off-policy)
#   bridge-half   12 steps, the first 4 on the teacher's samples; merged, then
#   bridge-grpo   6 steps x 4 x 8 of GRPO from it: the bridge followed by GRPO, 384 in all
# All 500 test problems after training, paired against the cold student. Resumable: a run whose
# summary.json is under RESULTS already is skipped; seed 1 first, then seed 2 of every arm.
#
#   source .venv/bin/activate; bash toy/study_distill_smollm2.sh
#   python toy/compare.py docs/results/distill-smollm2/*-[0-9] --ignore model \
#       --base docs/results/distill-smollm2/student --plot docs/results/distill-smollm2/compare.png
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=docs/results/distill-smollm2
OUT=out/distill-smollm2
STUDENT=models/SmolLM2-135M-Instruct
TEACHER=models/SmolLM2-warm
mkdir -p "$RESULTS" "$OUT"
[ -f "$TEACHER/config.json" ] || { echo "no $TEACHER: run toy/study_opsd_smollm2.sh first"; exit 1; }

# The cold student closed-book (the teacher's own score is the OPSD study's base/eval.json).
[ -f "$RESULTS/student/eval.json" ] || python toy/evaluate.py --model "$STUDENT" --eval-n 500 \
  --eval-k 0 --max-new-tokens 64 --eval-batch-size 250 --out "$RESULTS/student"

COMMON="--data toy --max-new-tokens 64 --lora-r 16 --lora-alpha 32 --lr 1e-4
  --no-gradient-checkpointing --micro-batch-size 0 --temperature 0.7 --top-p 1 --top-k 0
  --schedule constant --eval-n 500 --eval-batch-size 250 --no-eval-before"
DISTILL="--teacher-model $TEACHER --teacher-prompt plain --clip 0 --jsd-beta 0 --batch-size 16"
GRPO="--batch-size 4 --num-generations 8"
source toy/study_run.sh  # run NAME SCRIPT FLAGS...
for seed in 1 2; do
  run grpo-$seed grpo.py --model $STUDENT $GRPO --steps 12 --seed $seed
  run grpo-garl-$seed grpo.py --model $STUDENT $GRPO --steps 12 --garl-q 0.5 --seed $seed
  run sft-$seed sft.py --model $STUDENT --batch-size 16 --steps 24 --seed $seed
  run distill-$seed opsd.py --model $STUDENT $DISTILL --steps 24 --seed $seed
  run bridge-$seed opsd.py --model $STUDENT $DISTILL --steps 24 --teacher-rollout-steps 8 --seed $seed
  run bridge-half-$seed opsd.py --model $STUDENT $DISTILL --steps 12 --teacher-rollout-steps 4 --seed $seed
  if [ ! -f "$RESULTS/bridge-grpo-$seed/summary.json" ]; then
    python -c "import common, lora
model, tokenizer = common.load_model('$STUDENT')
lora.load_lora(model, '$OUT/bridge-half-$seed/checkpoint-000012')
lora.save_merged(model, tokenizer, '$OUT/bridge-half-$seed/merged')"
    run bridge-grpo-$seed grpo.py --model "$OUT/bridge-half-$seed/merged" $GRPO --steps 6 --seed $seed
  fi
done
