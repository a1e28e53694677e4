"""Hugging Face interop: import a family's checkpoint, train it, export it back.

    cfg, model = epmoe.hf.from_pretrained("path/to/hf_folder")
    epmoe.hf.save_pretrained(model, cfg, "path/to/out_folder")

Training imports with `train.init_from=<hf folder>`; `python -m epmoe.hf import|export` converts
offline. The families and their config translation: families.py; the tensor mapping: links.py.
"""

from epmoe.hf.convert import from_pretrained, load_weights, save_pretrained
from epmoe.hf.links import HFError

__all__ = ["HFError", "from_pretrained", "load_weights", "save_pretrained"]
