"""Export for deployment: `python export.py --checkpoint RUN --format gguf-tq2_0 --output m.gguf`.

Formats: gguf-tq2_0, gguf-tq1_0, gguf-q8_0, gguf-f16, gguf-f32 (llama.cpp), hf (transformers),
packed.
See tsld_jax/export_cli.py for the flags and tsld_jax/models/gguf_export.py for the GGUF types.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tsld_jax import export_cli

    sys.exit(export_cli.main())
