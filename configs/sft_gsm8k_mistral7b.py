"""The paper's SFT baseline on GSM8K with Mistral-7B-Instruct-v0.3: completion-only fine-tuning on the gold
rationales ("####" replaced by "The answer is")."""

from configs.base import paper_recipe


def get_config():
    return paper_recipe("mistralai/Mistral-7B-Instruct-v0.3", "gsm8k", stages="sft")
