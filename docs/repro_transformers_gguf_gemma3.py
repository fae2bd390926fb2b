"""Gemma-3-270M (Q4_K_M GGUF) on PTB: transformers and llama.cpp agree once they score the same ids.

    HF_HUB_OFFLINE=1 .venv/bin/python docs/repro_transformers_gguf_gemma3.py   # ~5 min on 2 cores

PTB's "<unk>" is Gemma's untrained <unk> (id 3) to transformers' tokenizer, text to llama.cpp
(split_special_tokens=True); llama.cpp on F32 weights has no 8-bit activations. docs/gemma3_gguf.md
"""

import os

import gguf
import llama_cpp
import numpy as np
import torch
from torch.nn.functional import cross_entropy
from transformers import AutoModelForCausalLM, AutoTokenizer

from tsld_jax.models import named

T, N, F32_PATH = 256, 4, "/tmp/gemma-3-270m-dequantized-f32.gguf"  # the first 4 blocks of 256
PTB = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ptb", "ptb.valid.txt")
folder, name = os.path.split(path := named.path(named.GEMMA3))
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
lines = [line.strip() for line in open(PTB).read().splitlines()[:400]]
torch.set_grad_enabled(False)


def llama_logits(gguf_path, blocks):
    llm = llama_cpp.Llama(gguf_path, logits_all=True, n_ctx=T, n_threads=2, verbose=False)
    logits = []
    for block in blocks:  # the token ids themselves, no text: both programs score the same ids
        llm.reset()
        llm.eval(block.tolist())
        logits.append(np.array(llm.scores[: T - 1]))  # a copy: the next eval overwrites scores
    return torch.tensor(np.concatenate(logits))


# The same file with every tensor dequantized by gguf-py (what transformers holds) and kept in F32.
reader, writer = gguf.GGUFReader(path), gguf.GGUFWriter(F32_PATH, arch="gemma3")
for field in reader.fields.values():
    if field.name != "general.architecture" and not field.name.startswith("GGUF."):
        value = 0 if field.name == "general.file_type" else field.contents()  # 0: all F32
        writer.add_key_value(field.name, value, field.types[0], sub_type=field.types[-1])
for t in reader.tensors:
    writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
print(f"{'PTB <unk> as':22s} {'BOS':9s} {'llama.cpp':>9s} {'transformers':>12s}   diff")
for split, unk in ((False, "special <unk> (id 3)"), (True, "text '<','unk','>'")):
    for bos in ("none", "per line"):
        ids = tokenizer(lines, add_special_tokens=bos != "none", split_special_tokens=split)
        blocks = np.array([t for line in ids["input_ids"] for t in line][: N * T]).reshape(N, T)
        targets = torch.tensor(blocks[:, 1:]).flatten()
        hf = cross_entropy(model(torch.tensor(blocks)).logits[:, :-1].flatten(0, 1), targets).exp()
        for label, gguf_path in ((unk, path), ("  llama.cpp on F32", F32_PATH)):
            ours = cross_entropy(llama_logits(gguf_path, blocks), targets).exp()
            print(f"{label:22s} {bos:9s} {ours:9.1f} {hf:12.1f} {100 * (ours / hf - 1):+5.1f}%")
