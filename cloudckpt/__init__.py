"""cloudckpt: PyTorch Distributed Checkpoint storage for S3, GCS and local disk.

Quick use::

    import cloudckpt
    cloudckpt.save(state_dict, "s3://bucket/run/step-100")
    cloudckpt.load(state_dict, "s3://bucket/run/step-100")
"""

from cloudckpt._version import __version__

from cloudckpt.api import AsyncSaveResponse, async_save, load, save, storage_reader, storage_writer  # noqa: E402
from cloudckpt.errors import (  # noqa: E402
    AccessDeniedError,
    BucketNotFoundError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CloudCheckpointError,
    EndpointUnreachableError,
    IntegrityError,
    InvalidURIError,
    ObjectNotFoundError,
    PreconditionFailedError,
    TransferError,
    UnsafeMetadataError,
    UnsupportedSchemeError,
    UnsupportedTensorError,
)
from cloudckpt.reader import (  # noqa: E402
    CloudStorageReader,
    GCSStorageReader,
    LocalStorageReader,
    S3StorageReader,
)
from cloudckpt.manager import CheckpointManager  # noqa: E402
from cloudckpt.executors import ProcessCheckpointExecutor, ThreadCheckpointExecutor  # noqa: E402
from cloudckpt.staging import Stager  # noqa: E402
from cloudckpt.transfer import TransferOptions  # noqa: E402
from cloudckpt.uri import StorageURI, parse_uri  # noqa: E402
from cloudckpt.verify import verify  # noqa: E402
from cloudckpt.writer import (  # noqa: E402
    CloudStorageWriter,
    GCSStorageWriter,
    LocalStorageWriter,
    S3StorageWriter,
)

__all__ = [
    "__version__",
    "save",
    "load",
    "storage_writer",
    "storage_reader",
    "async_save",
    "AsyncSaveResponse",
    "ThreadCheckpointExecutor",
    "ProcessCheckpointExecutor",
    "Stager",
    "CheckpointManager",
    "S3StorageWriter",
    "S3StorageReader",
    "GCSStorageWriter",
    "GCSStorageReader",
    "LocalStorageWriter",
    "LocalStorageReader",
    "CloudStorageWriter",
    "CloudStorageReader",
    "TransferOptions",
    "StorageURI",
    "parse_uri",
    "verify",
    "CloudCheckpointError",
    "InvalidURIError",
    "UnsupportedSchemeError",
    "BucketNotFoundError",
    "ObjectNotFoundError",
    "CheckpointNotFoundError",
    "CheckpointExistsError",
    "EndpointUnreachableError",
    "AccessDeniedError",
    "TransferError",
    "PreconditionFailedError",
    "IntegrityError",
    "UnsupportedTensorError",
    "UnsafeMetadataError",
]
