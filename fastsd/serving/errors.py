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


# what a caller is told for each status the deployment answers with (the gRPC text stays in the logs):
# every front door says these, never gRPC's own text, addresses or exception text
PLAIN_MESSAGES = {
    "DEADLINE_EXCEEDED": "the request did not finish within its deadline",
    "UNAVAILABLE": "the deployment is not available now; retry later",
    "RESOURCE_EXHAUSTED": "the deployment is at capacity; retry later",
    "UNIMPLEMENTED": "the deployment does not serve this request",
    "CANCELLED": "the request was cancelled",
    "ABORTED": "the request was interrupted (POST /sdapi/v1/interrupt)",
}
# statuses only fastsd's replicas send, with a message of fastsd's own (the parameter refused; where an
# interrupt stopped the call): passed on as they are
OWN_MESSAGES = ("INVALID_ARGUMENT", "ABORTED")
FAILED_MESSAGE = "the deployment failed to answer this request; its logs have the details (request id)"


def plain_message(e: DeploymentError) -> str:
    """The caller's message for `e`: fastsd's own reason for a refused value (INVALID_ARGUMENT names the
    parameter) or an interrupt (ABORTED), else a fixed plain message for the status, and the status's name."""
    if e.code in OWN_MESSAGES:
        return str(e)
    return f"{PLAIN_MESSAGES.get(e.code, FAILED_MESSAGE)} ({e.code})"
