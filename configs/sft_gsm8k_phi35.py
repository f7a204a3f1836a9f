"""The paper's SFT baseline on GSM8K with Phi-3.5-mini-instruct: completion-only fine-tuning on the gold
rationales ("####" replaced by "The answer is")."""

from configs.base import paper_recipe


def get_config():
    return paper_recipe("microsoft/Phi-3.5-mini-instruct", "gsm8k", stages="sft")
