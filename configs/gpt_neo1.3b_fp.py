"""EleutherAI/gpt-neo-1.3B: full-precision fine-tune on PTB (the teacher) (PAPER.md)."""

from configs import paper


def get_config():
    return paper.config("gpt_neo1.3b", "fp")
