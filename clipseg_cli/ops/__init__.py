"""Pure array functions, no files: the model's input resize and upsampled probabilities
(:mod:`.transforms`), image prompts and conditional arithmetic (:mod:`.prompts`), edge
refinement (:mod:`.matting`), composites (:mod:`.compose`) and metrics (:mod:`.metrics`); and
CLIP's tokenizer (:mod:`.tokenizer`), whose one read is open_clip's bundled vocabulary file."""
