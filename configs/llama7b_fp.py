"""huggyllama/llama-7b: full-precision fine-tune on PTB (the teacher) (PAPER.md)."""

from configs import paper


def get_config(target: str = ""):
    # target: "" (any 1-4 devices), "8xa100", "1xh100", "v5p-8" or "v6e-8" (paper.TARGETS):
    # CONFIG.py:8xa100
    return paper.config("llama7b", "fp", target)
