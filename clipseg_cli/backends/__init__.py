"""Backends for the image side of CLIPSeg: the vision blocks up to the decoder's deepest layer
plus the decoder, as one call ``logits(pixels, conditionals)``, numpy in, numpy out.

* :mod:`.base`: the :class:`~.base.ImageBackend` protocol and the input checks both share;
* :mod:`.torch`: :class:`~.torch.TorchImageBackend`, today's torch math (and the module the
  exporter traces);
* :mod:`.onnx`: :class:`~.onnx.OnnxImageBackend` on an ONNX Runtime session, and
  :func:`~.onnx.open_onnx_backend`, which finds the graph in the cache or builds it;
* :mod:`.openvino`: :class:`~.openvino.OpenVinoImageBackend`, the same cached graphs compiled
  by OpenVINO (fp32, bf16 on CPUs with native bf16 such as AMX, int8);
* :mod:`.tuning`: which CPU runtime and precision a model runs, chosen by measuring them on
  this machine, and the cache of that choice;
* :mod:`.machine`: the CPU's model, flags and cores;
* :mod:`.text`: :class:`~.text.OnnxTextEncoder`, the text tower's graph on ONNX Runtime (text
  prompts -> conditionals), and :func:`~.text.open_text_encoder`, which finds or builds it;
* :mod:`.export` (torch): the fp32 image and text graphs from a
  :class:`~clipseg_cli.model.clipseg.ClipSegModel`;
* :mod:`.quantize`: the int8 graph from the fp32 one (ONNX Runtime's dynamic quantisation);
* :mod:`.cache`: the on-disk cache of graphs and of text-prompt embeddings (standard library
  only until text embeddings are read or written, which need numpy).

Only :mod:`.torch` and :mod:`.export` import torch: a warm run with cached graphs never does,
whether its text prompts are cached or new. This package never prints; messages go to callbacks.
"""

from __future__ import annotations

#: Graph variants: the exported float32 image graph, its dynamically quantised int8 copy, and
#: the float32 text tower (:mod:`.text`: new text prompts embedded without torch).
GRAPH_VARIANTS = ("fp32", "int8", "text")
#: The image graphs among them (what an image backend runs).
IMAGE_VARIANTS = ("fp32", "int8")

__all__ = ["GRAPH_VARIANTS", "IMAGE_VARIANTS"]
