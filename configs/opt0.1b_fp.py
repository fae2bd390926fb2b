"""facebook/opt-125m: full-precision fine-tune on PTB (the teacher) (PAPER.md)."""

from configs import paper


def get_config():
    return paper.config("opt0.1b", "fp")
