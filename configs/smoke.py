"""A tiny random LLaMA-family student/teacher pair: QAT-TSLD steps in seconds on a CPU."""

from configs import base


def get_config():
    c = base.get_config()
    c.model.name_or_path = "random"
    c.data.name = "generated"  # or --config.data.name=ptb --config.data.dir=../shared/data
    c.data.block_size = 32
    c.data.batch_size = 4
    c.data.eval_blocks = 4
    c.data.generated_sequences = 32
    c.train.steps = 20
    c.train.lr = 3e-3
    c.checkpoint.every_steps = 5
    c.log.every_steps = 1
    return c
