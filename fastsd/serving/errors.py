"""What serving raises: one error for a deployment that cannot be used as asked, and one for an
answer the deployment gave with a gRPC status other than OK."""
from __future__ import annotations

from ..errors import FastSDError


class ServingError(FastSDError):
    """A deployment that cannot be started, found, queried or stopped as asked."""


class DeploymentError(ServingError):
    """The deployment answered with an error (or not at all); `code` is the gRPC status name;
    `retry_after`: seconds after which a refused request (RESOURCE_EXHAUSTED, UNAVAILABLE) may be sent again."""

    def __init__(self, code: str, message: str, retry_after: float | None = None):
        self.code = code
        self.retry_after = retry_after
        super().__init__(message)
