"""gpt2-medium: ternary TWN QAT with TSLD on PTB, from the FP export (PAPER.md)."""

from configs import paper


def get_config():
    return paper.config("gpt2_0.3b", "tsld")
