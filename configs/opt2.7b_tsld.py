"""facebook/opt-2.7b: ternary TWN QAT with TSLD on PTB, from the FP export (PAPER.md)."""

from configs import paper


def get_config():
    return paper.config("opt2.7b", "tsld")
