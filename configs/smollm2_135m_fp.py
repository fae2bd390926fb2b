"""SmolLM2-135M: full-precision fine-tune (the teacher for smollm2_135m_tsld)."""

from configs import smollm2_135m_tsld


def get_config():
    c = smollm2_135m_tsld.get_config()
    c.stage = "fp"
    c.loss.kind = "gt"
    c.quant.method = "none"
    return c
