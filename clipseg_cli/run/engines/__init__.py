"""The engines that schedule a run's per-item steps: :mod:`.local` (threads on this machine)
and :mod:`.ray` (tasks and actors on a Ray cluster). Both have the signature of
:class:`clipseg_cli.run.steps.Engine`; neither imports the other or the pipeline."""
