"""Exceptions raised by fastsd.kernels."""

from __future__ import annotations

from fastsd.errors import FastSDError


class BackendUnavailable(FastSDError, ValueError):  # FastSDError: the CLI prints it as one line, exit 2
    """An attention backend (or fused op) was asked for by name but cannot run here.

    The message names the backend, says why it cannot run on the requested device and dtype,
    and lists the backends that can.
    """

    def __init__(self, name: str, reason: str, available: list[str], device=None, dtype=None):
        self.name = name
        self.reason = reason
        self.available = list(available)
        where = ""
        if device is not None or dtype is not None:
            where = f" on {device} with {dtype}"
        avail = ", ".join(self.available) if self.available else "none"
        super().__init__(
            f"attention backend {name!r} is unavailable{where}: {reason}. "
            f"Available here: {avail} (or use 'auto')."
        )


class NonFiniteError(FloatingPointError):
    """A tensor (latents, noise prediction, decoded image) contains NaN or inf values."""
