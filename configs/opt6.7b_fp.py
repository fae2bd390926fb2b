"""facebook/opt-6.7b: full-precision fine-tune on PTB (the teacher) (PAPER.md)."""

from configs import paper


def get_config():
    return paper.config("opt6.7b", "fp")
