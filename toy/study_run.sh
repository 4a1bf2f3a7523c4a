# One run of a study, sourced by toy/study_*.sh, which set RESULTS (committed files), OUT (the
# runs' folders) and COMMON (the flags every run of the study shares).
run() {  # run NAME SCRIPT FLAGS...: train unless RESULTS has it, then keep its files
  local name=$1 script=$2; shift 2
  [ -f "$RESULTS/$name/summary.json" ] && return
  python "$script" $COMMON "$@" --out "$OUT/$name" --overwrite
  mkdir -p "$RESULTS/$name"
  cp "$OUT/$name/summary.json" "$OUT/$name/metrics.jsonl" "$RESULTS/$name/"
}
