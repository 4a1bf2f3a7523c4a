#!/usr/bin/env bash
# The OPSD study on SmolLM2-135M-Instruct (README, "The comparisons"), fixed before it ran.
# Resumable: a run whose summary.json is under RESULTS already is skipped, so the study can run in
# parts across sessions. Each finished run's summary.json and metrics.jsonl (and each evaluation's
# eval.json) are copied to RESULTS, from which toy/compare.py rebuilds the table and the plot:
#
#   bash toy/study_opsd_smollm2.sh            # 2 CPU cores: about 120 minutes in all
#   python toy/compare.py docs/results/opsd-smollm2/[gos]* --base docs/results/opsd-smollm2/base \
#       --plot docs/results/opsd-smollm2/compare.png
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=docs/results/opsd-smollm2
OUT=out/opsd-smollm2
BASE=models/SmolLM2-warm
mkdir -p "$RESULTS" "$OUT"

# The base: SmolLM2 after the same 40-step SFT warm-up as the first study, merged into a folder.
if [ ! -f "$BASE/config.json" ]; then
  [ -f models/SmolLM2-135M-Instruct/config.json ] || python toy/smollm2.py
  python sft.py --model models/SmolLM2-135M-Instruct --data toy --steps 40 --batch-size 16 \
    --lr 2e-4 --max-new-tokens 64 --lora-r 16 --lora-alpha 32 --no-gradient-checkpointing \
    --micro-batch-size 0 --eval-n 0 --out "$OUT/warmup" --overwrite
  python -c "import common, lora
model, tokenizer = common.load_model('models/SmolLM2-135M-Instruct')
lora.load_lora(model, '$OUT/warmup/checkpoint-000040')
lora.save_merged(model, tokenizer, '$BASE')"
fi

# The premise: the base closed-book, and with OPSD's teacher prompt (the reference solution shown).
EVAL="--model $BASE --eval-n 500 --eval-k 0 --max-new-tokens 64 --eval-batch-size 250"
for view in student teacher; do
  name=$([ $view = student ] && echo base || echo base-teacher)
  if [ ! -f "$RESULTS/$name/eval.json" ]; then
    python toy/evaluate.py $EVAL --view $view --out "$RESULTS/$name"
  fi
done

# The runs: every one from the base, the same settings, all 500 test problems after training.
COMMON="--model $BASE --data toy --max-new-tokens 64 --lora-r 16 --lora-alpha 32
  --no-gradient-checkpointing --micro-batch-size 0 --temperature 0.7 --top-p 1 --top-k 0
  --schedule constant --eval-n 500 --eval-batch-size 250 --no-eval-before"
source toy/study_run.sh  # run NAME SCRIPT FLAGS...
OPSD="--lr 1e-4 --steps 12 --batch-size 16"   # the paper's loss: forward KL, entries capped at 0.05
GRPO="--lr 1e-4 --steps 30 --batch-size 4"    # 8 samples a problem
run opsd-1 opsd.py $OPSD --seed 1
run grpo-1 grpo.py $GRPO --seed 1
run opsd-noclip-1 opsd.py $OPSD --clip 0 --seed 1
run opsd-tokenclip-1 opsd.py $OPSD --clip-per token --seed 1
for seed in 2 3; do
  run opsd-$seed opsd.py $OPSD --seed $seed
  run grpo-$seed grpo.py $GRPO --seed $seed
done
run sft-1 sft.py --lr 1e-4 --steps 12 --batch-size 16 --seed 1
run opsd-lr1e-5-1 opsd.py --lr 1e-5 --steps 48 --batch-size 16 --seed 1   # 10x smaller, 4x the steps
run opsd-32prompts-1 opsd.py --lr 1e-4 --steps 12 --batch-size 32 --seed 1   # the paper's 32 a step
