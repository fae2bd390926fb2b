"""facebook/opt-1.3b: full-precision fine-tune on PTB (the teacher) (PAPER.md)."""

from configs import paper


def get_config():
    return paper.config("opt1.3b", "fp")
