"""The paper's SFT baseline on GSM8K with Llama-3.1-8B-Instruct: completion-only fine-tuning on the gold
rationales ("####" replaced by "The answer is")."""

from configs.base import paper_recipe


def get_config():
    return paper_recipe("meta-llama/Llama-3.1-8B-Instruct", "gsm8k", stages="sft")
