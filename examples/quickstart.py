"""The README quick start: load the shipped learner, inject documents, generate, and see the weights restored."""

from regrad_hf import GradientBank, ReGradForCausalLM
from regrad_hf.defaults import shipped_learner_path

model = ReGradForCausalLM.from_pretrained(shipped_learner_path())  # meta-trained learner on the embedded SmolLM2
documents = [
    "Zorbia's capital is Quentville, a harbour town founded in 1642.",
    "The Velomar bicycle has a bamboo frame.",
]
bank = GradientBank.build(model, documents, ids=["zorbia", "velomar"])
model.attach_bank(bank)

prompt = model.prompt_template.build(model.tokenizer, "What is the capital of Zorbia?")  # as in meta-training
inputs = model.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
output = model.generate(**inputs, max_new_tokens=20, do_sample=False, top_k_docs=1)  # retrieve, apply, generate, undo
print(model.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))

with model.knowledge(["Quillon is a board game with wooden swans."]):  # gradients computed on the spot
    print("inside: the LoRA tensors carry the step; outside: restored bit for bit")
