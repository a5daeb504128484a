"""`yaqa eval --tasks`: lm-evaluation-harness on the in-memory original and quantized models, with a local
multiple-choice task over local JSON (offline). Skipped where lm_eval is not installed (it is not a dependency:
`pip install lm_eval`); checked against the choices' log-likelihoods computed here with plain torch."""

from __future__ import annotations

import json
import re

import pytest
import torch

from yaqa_ext.cli import main
from yaqa_ext.models import load_model

pytest.importorskip("lm_eval", reason="lm_eval is an optional extra (pip install lm_eval)")

DOCS = [("Once upon a time, there was a little", [" girl", " quantum", " tax"], 0),
        ("The cat sat on the", [" carburetor", " mat", " algebra"], 1),
        ("She was very happy and", [" photosynthesis", " parliament", " smiled"], 2),
        ("Tom and his mom went to the", [" park", " integral", " oxide"], 0),
        # close calls: the label is not the model's favourite in every case, so the accuracy is not simply 1
        ("The little bird flew up to the", [" sky", " tree", " roof"], 2),
        ("Lily wanted to play with her", [" friend", " ball", " toys"], 0),
        ("One day, a big dog saw a", [" cat", " ball", " bone"], 2)]


def accuracy(model, tokenizer) -> float:
    """lm_eval's multiple-choice rule: the choice (after a space) of the highest summed log-probability given the
    context, its tokens those of context + choice beyond the context's."""
    right = 0
    for context, choices, label in DOCS:
        scores = []
        for choice in choices:
            ctx, whole = tokenizer.encode(context), tokenizer.encode(context + choice)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        right += max(range(len(choices)), key=scores.__getitem__) == label
    return right / len(DOCS)


def test_eval_runs_a_local_task_on_both_models(shared, tmp_path, capsys):
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"context": c, "choices": ch, "label": y})
                                                   for c, ch, y in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "toy.yaml").write_text(f"""task: yaqa_toy_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'docs.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    q = tmp_path / "q"
    assert main(["quantize", "--method", "rtn", "--bits", "4", "--out", str(q), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["eval", "--quant", str(q), "--n-seqs", "2", "--seq-len", "32", "--device", "cpu", "--tasks",
                 "yaqa_toy_choice", "--include-path", str(tmp_path / "tasks")]) == 0
    out = capsys.readouterr().out
    original, tokenizer = load_model("stories260K")
    quantized, _ = load_model(str(q), with_tokenizer=False)
    line = re.search(r"yaqa_toy_choice\s+acc,none\s+(\S+)\s+(\S+)", out)
    assert line, out
    expected = (accuracy(original, tokenizer), accuracy(quantized, tokenizer))  # the original scores 4/7
    assert (float(line.group(1)), float(line.group(2))) == pytest.approx(expected, rel=1e-4)  # printed to 5 digits
    with pytest.raises(SystemExit):
        main(["eval", "--quant", str(q), "--n-seqs", "2", "--seq-len", "32", "--tasks", "yaqa_no_such_task"])
    assert "lm_eval knows no task 'yaqa_no_such_task'" in capsys.readouterr().err
