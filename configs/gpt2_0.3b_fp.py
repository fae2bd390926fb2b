"""gpt2-medium: full-precision fine-tune on PTB (the teacher) (PAPER.md)."""

from configs import paper


def get_config():
    return paper.config("gpt2_0.3b", "fp")
