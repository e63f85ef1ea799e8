"""NaN and inf checks of tensors (latents, noise predictions, decoded images), with fp16 overflow hints."""

from __future__ import annotations

import torch

from .errors import NonFiniteError


def check_finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Raise NonFiniteError if `tensor` holds NaN or inf; return it unchanged otherwise.

    `what` names the tensor in the message ("latents after step 12", "decoded image"). On CUDA this
    costs one device sync (the all-finite flag is read back), so call it once per step or per image,
    not per layer.
    """
    if not torch.is_tensor(tensor) or not tensor.is_floating_point():
        return tensor
    if bool(torch.isfinite(tensor).all()):
        return tensor
    n_nan = int(torch.isnan(tensor).sum())
    n_inf = int(torch.isinf(tensor).sum())
    dtype = str(tensor.dtype).replace("torch.", "")
    hint = ("fp16 has a max of 65504 and overflows in attention scores and VAE activations of some models "
            "(SD 2.x in particular): run in fp32 or bf16, or keep attention upcast on "
            "(install_attention(..., upcast=True)) and decode the VAE in fp32")
    if tensor.dtype != torch.float16:
        hint = ("this is not an fp16 overflow; check the inputs (prompt embeddings, init image, scheduler "
                "settings) or try fp32")
    raise NonFiniteError(
        f"{what} is not finite: {n_nan} NaN and {n_inf} inf of {tensor.numel()} values "
        f"({dtype}, shape {tuple(tensor.shape)}). {hint}."
    )
