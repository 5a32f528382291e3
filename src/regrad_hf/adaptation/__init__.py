"""The math of ReGrad: the learner's layout and step sizes, document gradients and the combined step, applying it and
restoring bit for bit, per-row LoRA, and the meta-objective. Tensors in, tensors out: no files, banks or generation.

Modules: `learner` (target discovery, peft LoRA injection, [`StepSizes`], identity and fingerprint), `per_sample`
(per-row Linear weight gradients), `deltas` (document gradients, combine, adapted parameters), `restore` (a step
applied in place and undone bit for bit), `multi_lora` (per-row LoRA tensors for heterogeneous batches), `objective`
(the bi-level meta-loss), `distillation` (the RAG teacher's KL term of that loss).
"""
