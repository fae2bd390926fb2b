"""gpt2: full-precision fine-tune on PTB (the teacher) (PAPER.md)."""

from configs import paper


def get_config():
    return paper.config("gpt2_0.1b", "fp")
