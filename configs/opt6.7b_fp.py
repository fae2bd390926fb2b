"""facebook/opt-6.7b: full-precision fine-tune on PTB (the teacher), PAPER.md's settings."""

from configs import base


def get_config():
    c = base.get_config()
    c.stage = "fp"
    c.model.name_or_path = "facebook/opt-6.7b"
    c.data.name = "ptb"
    c.data.block_size = 512
    c.data.batch_size = 4
    c.loss.kind = "gt"
    c.quant.method = "none"
    c.train.lr = 5e-05
    c.train.epochs = 3
    return c
