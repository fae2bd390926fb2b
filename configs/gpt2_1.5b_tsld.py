"""gpt2-xl: ternary TWN QAT with TSLD on PTB, from the FP export (PAPER.md)."""

from configs import paper


def get_config():
    return paper.config("gpt2_1.5b", "tsld")
