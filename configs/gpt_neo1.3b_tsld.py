"""EleutherAI/gpt-neo-1.3B: ternary TWN QAT with TSLD on PTB, from the FP export (PAPER.md)."""

from configs import paper


def get_config():
    return paper.config("gpt_neo1.3b", "tsld")
