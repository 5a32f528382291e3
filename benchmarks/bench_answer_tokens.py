"""Where greedy decoding loses the gold answer: the teacher-forced NLL of the reference answer's first token and of
its other tokens, and how often the first token is the model's top-1 / top-5 next token, per method, on the
questions of an earlier `regrad eval` run (the same prompt, the same retrieved documents). Prints a table and
writes JSON.

    python benchmarks/bench_answer_tokens.py --eval benchmarks/results/eval_squad_dev_top3_shared_p1.2 \
        --bank /tmp/dev/bank_shipped_squad_dev --methods closed_book,no_adaptation,rag,regrad

`--bank` is the `--bank-cache` of that run: it holds the learner's gradients of every retrieved document and
their texts. The mean over all answer tokens (end of turn included) is `regrad eval`'s answer NLL, printed beside
as a check that the two computations agree.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from regrad_hf import GradientBank, ReGradForCausalLM
from regrad_hf.data.collator import answer_suffix
from regrad_hf.defaults import shipped_learner_path
from regrad_hf.evaluation.methods import MethodRunner, check_methods
from regrad_hf.evaluation.probe import next_token_score
from regrad_hf.prompting import PromptTemplate


def answer_token_scores(runner: MethodRunner, method: str, question: dict, bank: GradientBank) -> dict:
    """Teacher-forced scores of `question["answers"][0]` (the reference `regrad eval` scores) under `method`."""
    tokenizer = runner.model.tokenizer
    ids = question["retrieved_ids"]
    texts = [bank.document(i).text for i in ids]
    prompt = tokenizer(runner.prompt_text(method, question["question"], texts), add_special_tokens=False)["input_ids"]
    reference = question["answers"][0].strip() + answer_suffix(tokenizer)
    answer = tokenizer(reference, add_special_tokens=False)["input_ids"]
    with runner.state(method, ids) as model, torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer], device=model.device)).logits
    logits = logits[0, len(prompt) - 1 : -1].float()
    nll = -logits.log_softmax(-1)[torch.arange(len(answer)), torch.tensor(answer)]
    first = next_token_score(logits[0], answer[0])
    # The last answer token is the end of turn; "other" is the answer's text after its first token.
    other = nll[1:-1]
    return {
        "first_nll": first.nll,
        "other_nll": other.mean().item() if len(other) else None,
        "mean_nll": nll.mean().item(),
        "first_rank": first.rank,
    }


def summarise(rows: list[dict]) -> dict:
    others = [r["other_nll"] for r in rows if r["other_nll"] is not None]
    return {
        "first_token_nll": sum(r["first_nll"] for r in rows) / len(rows),
        "other_tokens_nll": sum(others) / len(others),
        "answer_nll": sum(r["mean_nll"] for r in rows) / len(rows),
        "first_token_top1": sum(r["first_rank"] == 0 for r in rows) / len(rows),
        "first_token_top5": sum(r["first_rank"] < 5 for r in rows) / len(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", required=True, help="output folder of a regrad eval run (its results.json)")
    parser.add_argument("--bank", required=True, help="that run's --bank-cache (the learner's bank)")
    parser.add_argument("--learner", default=str(shipped_learner_path()))
    parser.add_argument("--methods", default="closed_book,no_adaptation,rag,regrad")
    parser.add_argument("--output", help="JSON path (default: answer_tokens.json in --eval)")
    args = parser.parse_args()

    results = json.loads((Path(args.eval) / "results.json").read_text())
    methods = check_methods(args.methods.split(","))
    model = ReGradForCausalLM.from_pretrained(args.learner)
    bank = GradientBank.from_pretrained(args.bank)
    model.attach_bank(bank)
    runner = MethodRunner(model, prompt=PromptTemplate(**results["prompt"]), gamma=results["run"]["gamma"])
    table = {}
    for method in methods:
        rows = [answer_token_scores(runner, method, question, bank) for question in results["questions"]]
        table[method] = summarise(rows)
        reported = [q["methods"][method]["answer_nll"] for q in results["questions"] if method in q["methods"]]
        table[method]["regrad_eval_answer_nll"] = sum(reported) / len(reported) if reported else None

    print(f"{results['run']['dataset']}, {len(results['questions'])} questions, top-{results['top_k']}")
    print("| method | first-token NLL | other tokens' NLL | answer NLL (regrad eval's) | first token top-1 | top-5 |")
    print("|---|---|---|---|---|---|")
    for method, row in table.items():
        check = row["regrad_eval_answer_nll"]
        print(
            f"| {method} | {row['first_token_nll']:.3f} | {row['other_tokens_nll']:.3f} | {row['answer_nll']:.3f} "
            f"({'-' if check is None else f'{check:.3f}'}) | {row['first_token_top1']:.3f} | "
            f"{row['first_token_top5']:.3f} |"
        )
    output = Path(args.output or Path(args.eval) / "answer_tokens.json")
    record = {"eval": args.eval, "learner": args.learner, "questions": len(results["questions"]), "methods": table}
    output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
