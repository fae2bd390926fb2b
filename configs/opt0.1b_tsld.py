"""facebook/opt-125m: ternary TWN QAT with TSLD on PTB, from the FP export (PAPER.md)."""

from configs import paper


def get_config():
    return paper.config("opt0.1b", "tsld")
