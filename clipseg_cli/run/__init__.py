"""One ``segment`` / ``matte`` run over many inputs: its options (:mod:`.config`), resume
state (:mod:`.ledger`), planning (:mod:`.inputs`), prompts (:mod:`.promptset`), the per-item
work (:mod:`.items`, :mod:`.steps`), the engines that schedule it (:mod:`.engines`) and the
pipeline that records every result (:mod:`.pipeline`)."""
