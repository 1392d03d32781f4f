"""convd's errors: one class per gRPC status a call can end with, each carrying the code and the
daemon's message (which says what to change)."""
import grpc


class Error(Exception):
    """A call ended with a gRPC status other than OK: `code` (grpc.StatusCode) and `details`
    (the daemon's message)."""

    def __init__(self, code, details):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class InvalidArgument(Error):
    """A shape, parameter or stream was wrong; the message names it."""


class NotFound(Error):
    """An unknown weights id or region."""


class ResourceExhausted(Error):
    """Over a limit of the daemon (request size, admission); retry later or split the call."""


class Unavailable(Error):
    """No daemon there, or it is shutting down."""


class DeadlineExceeded(Error):
    """The call's timeout passed."""


class Cancelled(Error):
    """The call was cancelled (Ctrl-C, or the client went away)."""


class Unauthenticated(Error):
    """A token is needed (token= or $CONVD_TOKEN), or the one sent is not the daemon's."""


class Unimplemented(Error):
    """The daemon does not serve this (a method, dtype or feature)."""


class FailedPrecondition(Error):
    """E.g. unregistering a region a call uses."""


class DataLoss(Error):
    """A shared-memory region lost pages during the call."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.DATA_LOSS: DataLoss,
}


def from_rpc_error(e, target=None):
    """The convd.Error for a grpc.RpcError."""
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and target and "connect" in details.lower():
        details = f"is convd running at {target}? ({details})"
    return _BY_CODE.get(code, Error)(code, details)


def from_code(code, details):
    """The convd.Error for a status the daemon gave outside a call (its descriptor socket)."""
    return _BY_CODE.get(code, Error)(code, details)
