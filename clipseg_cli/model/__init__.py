"""CLIPSeg in pure torch: the network (:mod:`.clipseg`), its CLIP towers (:mod:`.backbone`), the
decoder (:mod:`.decoder`), the tokenizer (as tensors) and precision names. No file I/O, no images
from disk: tensors in, tensors out."""
