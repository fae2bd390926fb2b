"""gemma3-270m (Gemma-3-270M): ternary TWN QAT with TSLD on PTB, from the FP export.

One of today's rows of configs/paper.py: the paper's recipe, its learning rate and epochs ours.
"""

from configs import paper


def get_config(target: str = ""):
    # target: "" (any 1-4 devices), "8xa100", "1xh100", "v5p-8" or "v6e-8" (paper.TARGETS):
    # CONFIG.py:8xa100
    return paper.config("gemma3_270m", "tsld", target)
