"""Dense -> MoE upcycling: a trained dense model (a Hugging Face llama / qwen3 folder, or an epmoe
checkpoint of a dense model) becomes the starting point of a native MoE model.

    python -m epmoe.upcycle <dense source> <run dir> model.num_experts=8 upcycle.method=granular ...

writes `<run dir>/checkpoints/step_00000000` (a fresh optimizer, step 0), which trains with
`train.resume=<run dir>` as an import does (`python -m epmoe.hf import`). Attention, norms,
embeddings and the head are the dense model's; each MoE layer comes from its block's dense FFN by
one of three methods (methods.py): copy (exact), granular (exact when top_k is a multiple of the
granularity), clusters (Read-ME-style; measured). options.py turns the command line into the MoE
model's Config; assemble.py builds the model and measures its deviation from the dense one.

This package sits with the command lines over checkpoints (epmoe.generate, epmoe.eval): it reads
Hugging Face folders (epmoe.hf) and checkpoints (epmoe.train).
"""

from epmoe.upcycle.assemble import Report, load_dense, upcycle
from epmoe.upcycle.options import UpcycleError, UpcycleOptions, split_overrides, target_config

__all__ = ["Report", "UpcycleError", "UpcycleOptions", "load_dense", "split_overrides", "target_config", "upcycle"]
