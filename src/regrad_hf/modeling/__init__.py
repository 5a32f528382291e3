"""[`ReGradForCausalLM`]: any causal LM plus a ReGrad learner and a gradient bank, and the parts it is made of: the
knowledge-injection and learner-state mixins, peft's conventions, the card and Hub methods, its files and checks.

Modules: `causal_lm` (construction, loading and saving, identity, forward), `injection` (attached bank, `knowledge` /
`retrieved` / `injected`, `generate` with retrieval), `learner_state` (state dicts, `load_learner`, swaps,
`init_from_learner`), `peft_conventions` (`disable_adapter`, adapter methods, counts, `export_adapter`),
`learner_files` (all-or-nothing saves, symlink-free reads), `generation_checks` (typed checks of `generate` inputs and
generation configs), `query` (the retrieval query of a prompt).
"""

from transformers import AutoModelForCausalLM

from ..config import ReGradConfig
from .causal_lm import ReGradForCausalLM

# `AutoModelForCausalLM.from_pretrained(regrad_repo)` and `pipeline(model=regrad_repo)` build a ReGradForCausalLM (when
# this package is imported: see regrad_hf.auto_registration).
AutoModelForCausalLM.register(ReGradConfig, ReGradForCausalLM, exist_ok=True)

__all__ = ["ReGradForCausalLM"]
