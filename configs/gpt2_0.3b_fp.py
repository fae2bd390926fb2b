"""gpt2-medium: full-precision fine-tune on PTB (the teacher), PAPER.md's settings."""

from configs import base


def get_config():
    c = base.get_config()
    c.stage = "fp"
    c.model.name_or_path = "gpt2-medium"
    c.data.name = "ptb"
    c.data.block_size = 512
    c.data.batch_size = 4
    c.loss.kind = "gt"
    c.quant.method = "none"
    c.train.lr = 0.0001
    c.train.epochs = 3
    return c
