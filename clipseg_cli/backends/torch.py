"""The torch image backend: exactly the Segmenter's math (normalise on the device, the model's
forward, float32 out), as a tensor-level function, as the module the ONNX exporter traces, and
as a numpy-in, numpy-out :class:`TorchImageBackend`; and the text tower as the module the text
graph's exporter traces."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clipseg_cli.backends.base import check_inputs, empty_logits
from clipseg_cli.model.clipseg import ClipSegModel


@torch.inference_mode()
def image_logits(
    model: ClipSegModel,
    batch: torch.Tensor,
    conditionals: torch.Tensor,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """uint8 ``[B, S, S, 3]`` images at the model size and ``[K, D]`` conditionals ->
    float32 logits ``[B, K, S, S]`` on ``device`` (default: the model's).

    Only uint8 bytes cross to the device; the vision pass runs once per image for all K.
    """
    device = torch.device(device) if device is not None else model.pixel_mean.device
    pixels = model.normalize(batch.to(device, non_blocking=True))
    return model(pixels, conditionals.to(device)).float()


class ImageGraphModule(nn.Module):
    """``(pixels uint8 [B, S, S, 3], conditionals float32 [K, D]) -> logits float32
    [B, K, S, S]``: ImageNet normalisation, the vision pass and the decoder in one module, the
    graph :func:`clipseg_cli.backends.export.export_image_graph` exports."""

    def __init__(self, model: ClipSegModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, conditionals: torch.Tensor) -> torch.Tensor:
        model = self.model
        return model(model.normalize(pixels), conditionals).float()


class TextGraphModule(nn.Module):
    """``tokens int64 [K, L] -> conditionals float32 [K, D]``: the text tower as
    ``Segmenter.embed_texts`` runs it, the graph
    :func:`clipseg_cli.backends.export.export_text_graph_bytes` exports."""

    def __init__(self, model: ClipSegModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens).float()


class TorchImageBackend:
    """:class:`~clipseg_cli.backends.base.ImageBackend` on a :class:`ClipSegModel` (any device,
    any dtype the model has)."""

    name = "torch"

    def __init__(self, model: ClipSegModel, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.input_size: int = model.arch.input_size
        self.embed_dim: int = model.arch.embed_dim

    def logits(self, pixels: np.ndarray, conditionals: np.ndarray) -> np.ndarray:
        """uint8 ``[B, S, S, 3]`` and ``[K, D]`` -> float32 numpy logits ``[B, K, S, S]``."""
        pixels, conditionals = check_inputs(pixels, conditionals, self.input_size, self.embed_dim)
        if pixels.shape[0] == 0 or conditionals.shape[0] == 0:
            return empty_logits(pixels.shape[0], conditionals.shape[0], self.input_size)
        batch = torch.from_numpy(pixels)
        if self.device.type == "cuda":
            batch = batch.pin_memory()  # lets the upload run asynchronously
        out = image_logits(self.model, batch, torch.from_numpy(conditionals), self.device)
        return out.cpu().numpy()  # one synchronisation per batch
