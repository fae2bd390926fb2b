"""facebook/opt-1.3b: ternary TWN QAT with TSLD on PTB, from the FP export (PAPER.md)."""

from configs import paper


def get_config():
    return paper.config("opt1.3b", "tsld")
