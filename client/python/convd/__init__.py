"""convd: 2D convolution through a convd daemon (gRPC), on numpy arrays.

    import numpy as np, convd
    with convd.Client("127.0.0.1:50051") as c:
        y = c.conv2d(np.ones((1, 3, 32, 32), np.float32), np.ones((8, 3, 3, 3), np.float32), padding=1)
"""
from ._client import Client
from .errors import (Cancelled, DataLoss, DeadlineExceeded, Error, FailedPrecondition, InvalidArgument,
                     NotFound, ResourceExhausted, Unauthenticated, Unavailable, Unimplemented)

__all__ = ["Client", "Error", "InvalidArgument", "NotFound", "ResourceExhausted", "Unavailable",
           "DeadlineExceeded", "Cancelled", "Unauthenticated", "Unimplemented", "FailedPrecondition",
           "DataLoss"]
__version__ = "0.1.0"
