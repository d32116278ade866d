"""``clipseg serve``: the model resident behind an HTTP API and a web page.

| module | owns |
|---|---|
| :mod:`.limits` | the one table of limits (option, default, status), standard library only |
| :mod:`.problems` | the error answers (``{"error", "detail"}``) |
| :mod:`.request` | a request's fields -> the run's options (never a path, a model, a URL) |
| :mod:`.service` | the model opened as a run opens it; prepare / predict / answer a request |
| :mod:`.batching` | gathering concurrent requests into model calls (local engine) |
| :mod:`.guard` | auth, body limits, slow clients, JSON errors, the request log |
| :mod:`.app` | the FastAPI routes and the page (``page/``, package files) |
| :mod:`.local`, :mod:`.ray` | the engines: uvicorn in this process, or Ray Serve |

It calls :mod:`clipseg_cli.run.items` like an engine does, answers with bytes instead of files,
and never writes a file or a run's state. Importing this package imports nothing heavy: the
command reads the limits' table from it before loading anything.
"""
