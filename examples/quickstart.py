"""The README quick start: load the shipped learner, answer from a bank through `generate` and a `pipeline`, inject
documents on the spot, and check that the weights are restored."""

from transformers import pipeline

from regrad_hf import GradientBank, ReGradForCausalLM
from regrad_hf.defaults import shipped_learner_path

model = ReGradForCausalLM.from_pretrained(shipped_learner_path())  # meta-trained learner on the embedded SmolLM2
bank = GradientBank.build(model, ["Zorbia's capital is Quentville.", "The Velomar bicycle has a bamboo frame."])
model.attach_bank(bank)

question = "What is the capital of Zorbia?"
prompt = model.prompt_template.build(model.tokenizer, question)  # the learner's own prompt
inputs = model.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
output = model.generate(**inputs, max_new_tokens=20)  # retrieve, apply, generate (the learner's decoding), restore
print(model.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))  # Quentville.

generator = pipeline("text-generation", model=model, tokenizer=model.tokenizer)  # the same prompt and decoding
print(generator(question, return_full_text=False)[0]["generated_text"])  # Quentville.
print(generator([{"role": "user", "content": question}])[0]["generated_text"][-1]["content"])  # Quentville.

before = {name: p.detach().numpy().tobytes() for name, p in model.lora_parameters().items()}
with model.knowledge(["Quillon is a board game with wooden swans."]):  # gradients computed on the spot
    print(generator("What is Quillon?", return_full_text=False)[0]["generated_text"])
after = {name: p.detach().numpy().tobytes() for name, p in model.lora_parameters().items()}
print("LoRA tensors restored bit for bit:", after == before)
