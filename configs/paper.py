"""The authors' recipe table (PAPER.md, "Training recipe"): one row per model.

Each `<model>_fp.py` / `<model>_tsld.py` file is `paper.config(model, stage)`; this file holds
the numbers once.
"""

from configs import base

# model: (hub id, FP learning rate, FP epochs, QAT learning rate, QAT epochs)
TABLE = {
    "gpt2_0.1b": ("gpt2", 1e-4, 3, 1e-4, 90),
    "gpt2_0.3b": ("gpt2-medium", 1e-4, 3, 1e-4, 60),
    "gpt2_0.6b": ("gpt2-large", 1e-4, 3, 1e-4, 30),
    "gpt2_1.5b": ("gpt2-xl", 1e-4, 3, 1e-4, 30),
    "opt0.1b": ("facebook/opt-125m", 1e-4, 3, 1e-4, 90),
    "opt1.3b": ("facebook/opt-1.3b", 1e-4, 3, 1e-4, 30),
    "opt2.7b": ("facebook/opt-2.7b", 5e-5, 3, 5e-5, 30),
    "opt6.7b": ("facebook/opt-6.7b", 5e-5, 3, 5e-5, 10),
    "gpt_neo1.3b": ("EleutherAI/gpt-neo-1.3B", 1e-4, 3, 1e-4, 30),
    "llama7b": ("huggyllama/llama-7b", 5e-5, 1, 7e-5, 5),
}


def config(model: str, stage: str):
    """PTB, batch 4 x 512, AdamW with linear decay, fp32; `stage` is "fp" or "tsld".

    The FP stage fine-tunes with the gt loss and writes the teacher to WORKDIR/export; the TSLD
    stage starts from it: --config.model.name_or_path=FP_WORKDIR/export.
    """
    hub_id, fp_lr, fp_epochs, qat_lr, qat_epochs = TABLE[model]
    c = base.get_config()
    c.model.name_or_path = hub_id
    c.data.name = "ptb"
    c.data.block_size = 512
    c.data.batch_size = 4
    if stage == "fp":
        c.stage, c.loss.kind, c.quant.method = "fp", "gt", "none"
        c.train.lr, c.train.epochs = fp_lr, fp_epochs
    else:
        c.stage, c.loss.kind = "qat", "tsld"
        c.quant.method, c.quant.bits = "twn", 2
        c.train.lr, c.train.epochs = qat_lr, qat_epochs
    return c
