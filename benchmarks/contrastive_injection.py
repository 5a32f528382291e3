"""Does contrasting the injected model with the un-injected learner make ReGrad's answers use the documents more?

Research probe for issue 29. ReGrad's failure mode on SQuAD dev is "right type, wrong value": the step moves the
answer toward the documents' topic, but the learner's prior still picks the value. Contrastive decoding (as in
context-aware decoding, here with the weight step in place of the pasted context) amplifies what the step changed:

    score(token) = (1 + beta) * log p_step(token) - beta * log p_theta0(token)

over the tokens the stepped model finds plausible (`log p_step >= max log p_step + log(plausibility)`); `beta = 0` is
plain greedy ReGrad. Both distributions come from one batched forward: row 0 runs with the step, row 1 with the
learner's own LoRA tensors ([`multi_lora.per_row_lora`]); the processor gives both rows the combined score, so they
decode the same tokens.

The questions, gold answers and retrieved documents are read from an earlier `regrad eval` run's results.json (the
same retrieval, the same bank cache), and every beta is paired against beta = 0 of this run (McNemar on contained).

    python benchmarks/contrastive_injection.py \
        --results benchmarks/results/eval_squad_dev_q300_v3_step1650/results.json \
        --learner /tmp/v3/step1650 --bank /tmp/v3/bank_step1650 --betas 0,0.5,1,2 \
        --output benchmarks/results/contrastive_squad_dev_q300_step1650
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from compare_paired import mcnemar_exact
from transformers import LogitsProcessor

from regrad_hf import GradientBank, ReGradForCausalLM
from regrad_hf.adaptation.multi_lora import per_row_lora
from regrad_hf.evaluation.metrics import answer_contained, f1_beyond_question, has_repetition
from regrad_hf.prompting import PromptTemplate


class StepContrast(LogitsProcessor):
    """Gives both rows of a (stepped, un-stepped) pair the contrastive score of the pair."""

    def __init__(self, beta: float, plausibility: float):
        self.beta, self.log_plausibility = beta, math.log(plausibility)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        log_probs = scores.float().log_softmax(-1)
        stepped, plain = log_probs[0], log_probs[1]
        combined = (1 + self.beta) * stepped - self.beta * plain
        combined[stepped < stepped.max() + self.log_plausibility] = -math.inf
        return combined.expand_as(scores).to(scores.dtype)


def answer(model, prompt: PromptTemplate, question: str, ids: list[str], beta: float, plausibility: float) -> str:
    tokenizer = model.tokenizer
    prompt_ids = tokenizer(prompt.build(tokenizer, question, None), add_special_tokens=False)["input_ids"]
    batch = torch.tensor([prompt_ids, prompt_ids])
    theta0 = {name: parameter.detach().clone() for name, parameter in model.lora_parameters().items()}
    settings = prompt.generation_kwargs(tokenizer, len(prompt_ids))
    settings["logits_processor"] = [*settings["logits_processor"], StepContrast(beta, plausibility)]
    with model.injected(ids):
        rows = {name: torch.stack((p.detach().clone(), theta0[name])) for name, p in model.lora_parameters().items()}
        with per_row_lora(model.language_model, rows), torch.no_grad():
            output = model.generate(
                input_ids=batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=24,
                do_sample=False,
                use_bank=False,
                **settings,
            )
    first, second = (tokenizer.decode(row[len(prompt_ids) :], skip_special_tokens=True) for row in output)
    assert prompt.cut(first) == prompt.cut(second), "the rows must decode the same answer"
    return prompt.cut(first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, help="an earlier `regrad eval` results.json (regrad method)")
    parser.add_argument("--learner", required=True)
    parser.add_argument("--bank", required=True, help="that run's --bank-cache directory")
    parser.add_argument("--betas", default="0,0.5,1")
    parser.add_argument("--plausibility", type=float, default=0.1)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    questions = json.loads(Path(args.results).read_text())["questions"][: args.limit]
    model = ReGradForCausalLM.from_pretrained(args.learner)
    model.attach_bank(GradientBank.from_pretrained(args.bank))
    prompt = PromptTemplate.from_config(model.config)
    betas = [float(b) for b in args.betas.split(",")]
    rows: dict[float, list[dict]] = {beta: [] for beta in betas}
    start = time.perf_counter()
    for number, q in enumerate(questions):
        for beta in betas:
            prediction = answer(model, prompt, q["question"], q["retrieved_ids"], beta, args.plausibility)
            rows[beta].append({
                "id": q["id"],
                "prediction": prediction,
                "contained": answer_contained(prediction, q["answers"]),
                "f1_beyond_question": f1_beyond_question(prediction, q["answers"], q["question"]),
                "repetition": has_repetition(prediction),
            })  # fmt: skip
        if number % 25 == 24:
            done = {b: sum(r["contained"] for r in rows[b]) / len(rows[b]) for b in betas}
            print(f"{number + 1} questions, {time.perf_counter() - start:.0f} s, contained {done}", flush=True)

    reference = [r["contained"] >= 0.5 for r in rows[betas[0]]]
    table = {}
    print(f"| beta | contained | F1 beyond q | repetition | vs beta={betas[0]:g} (b, c, McNemar p) |")
    print("|---|---|---|---|---|")
    for beta in betas:
        hits = [r["contained"] >= 0.5 for r in rows[beta]]
        only_this = sum(h and not r for h, r in zip(hits, reference, strict=True))
        only_reference = sum(r and not h for h, r in zip(hits, reference, strict=True))
        n = len(hits)
        table[beta] = {
            "contained": sum(hits) / n,
            "f1_beyond_question": sum(r["f1_beyond_question"] for r in rows[beta]) / n,
            "repetition": sum(r["repetition"] for r in rows[beta]) / n,
            "only_this": only_this,
            "only_reference": only_reference,
            "mcnemar_p": mcnemar_exact(only_this, only_reference),
        }
        t = table[beta]
        print(f"| {beta:g} | {t['contained']:.3f} | {t['f1_beyond_question']:.3f} | {t['repetition']:.3f} | "
              f"{only_this}, {only_reference}, {t['mcnemar_p']:.3g} |")  # fmt: skip
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    record = {
        "results": args.results, "learner": args.learner, "plausibility": args.plausibility, "questions": n,
        "seconds": time.perf_counter() - start, "table": table, "predictions": rows,
    }  # fmt: skip
    (output / "contrastive.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {output / 'contrastive.json'}")


if __name__ == "__main__":
    main()
