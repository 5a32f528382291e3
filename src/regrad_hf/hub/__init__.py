"""Sharing on the Hugging Face Hub: finding a learner's or a bank's files (a local folder or a Hub repo), pushing a
folder and pulling a repo (data files only), the model cards, and a learner's card and push as model methods.

Modules: `repos` ([`locate`], [`push_folder`], [`pull`]), `cards` (cards rendered from the template, merged into a
README), `publishing` (the card and `push_to_hub` methods of [`ReGradForCausalLM`]).
"""

from .repos import DATA_FILE_PATTERNS, README_FILE, HubOptions, Location, check_subfolder, locate, pull, push_folder

__all__ = [
    "DATA_FILE_PATTERNS",
    "README_FILE",
    "HubOptions",
    "Location",
    "check_subfolder",
    "locate",
    "pull",
    "push_folder",
]
