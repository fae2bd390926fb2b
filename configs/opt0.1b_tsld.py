"""facebook/opt-125m: ternary (TWN) QAT with TSLD on PTB, PAPER.md's settings.

Start from the FP stage's export: --config.model.name_or_path=FP_WORKDIR/export.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.stage = "qat"
    c.model.name_or_path = "facebook/opt-125m"
    c.data.name = "ptb"
    c.data.block_size = 512
    c.data.batch_size = 4
    c.loss.kind = "tsld"
    c.quant.method = "twn"
    c.quant.bits = 2
    c.train.lr = 0.0001
    c.train.epochs = 90
    return c
