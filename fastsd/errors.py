"""The errors fastsd raises for things a user can fix. The CLI prints them on one line and exits 2."""


class FastSDError(Exception):
    """Base of every user-facing fastsd error."""


class InvalidParameter(FastSDError, ValueError):
    """A parameter outside what is allowed; the message names the parameter and the allowed range."""

    def __init__(self, name: str, value, allowed: str):
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(f"{name}: got {value!r}; allowed: {allowed}")


class ModelLoadError(FastSDError):
    """A model that cannot be found or read (unknown name, missing folder, corrupt file)."""


class ReferenceMismatch(FastSDError):
    """An optimized path that is farther from the FP32 reference than its tolerance."""


class GenerationStopped(FastSDError):
    """A generation stopped between denoising steps because its caller asked it to (`should_stop`)."""
