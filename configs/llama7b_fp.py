"""huggyllama/llama-7b: full-precision fine-tune on PTB (the teacher) (PAPER.md)."""

from configs import paper


def get_config():
    return paper.config("llama7b", "fp")
