#!/usr/bin/env bash
# lm-evaluation-harness on yaqa folders (issue 16): `lm_eval --model hf` on the original stories260K and on
# a 4-bit rtn copy saved by `yaqa quantize`, over held-out corpus text (a local loglikelihood_rolling task),
# plus the refusal without trust_remote_code. lm_eval is not a dependency (~750 MB with datasets, pandas,
# scipy): install it first, e.g. `pip install --target /tmp/lmeval lm_eval` and LM_EVAL_PATH=/tmp/lmeval.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
W=${W:-yaqa_out/lm-eval-check}
export PYTHONPATH="${LM_EVAL_PATH:-}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$W"
"$PY" - "$W" <<'PY'
import json, sys
from pathlib import Path
from yaqa_ext.data import corpus_texts
from yaqa_ext.models import load_model
w = Path(sys.argv[1])
model, tok = load_model("stories260K")
model.save_pretrained(w / "original"); tok.save_pretrained(w / "original")
texts = [t for t in corpus_texts("evaluation") if len(t) > 200][:40]
(w / "heldout.jsonl").write_text("".join(json.dumps({"text": t[:1500]}) + "\n" for t in texts))
(w / "heldout.yaml").write_text(f"""task: yaqa_heldout
dataset_path: json
dataset_kwargs:
  data_files:
    test: {(w / 'heldout.jsonl').resolve()}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
PY
[ -f "$W/q4/config.json" ] || .venv/bin/yaqa quantize --method rtn --bits 4 --out "$W/q4"
for m in original q4; do
  echo "== lm_eval --model hf on $m"
  "$PY" -m lm_eval --model hf --model_args "pretrained=$W/$m,trust_remote_code=True" --include_path "$W" \
    --tasks yaqa_heldout --device cpu --batch_size 4 2>&1 | grep -E "^\|"
done
echo "== without trust_remote_code (must refuse, not load random weights)"
if "$PY" -m lm_eval --model hf --model_args "pretrained=$W/q4" --include_path "$W" --tasks yaqa_heldout \
     --device cpu > "$W/refusal.log" 2>&1; then
  echo "loaded without trust_remote_code: wrong"; exit 1
fi
grep -o "contains custom code.*" "$W/refusal.log" | head -1
