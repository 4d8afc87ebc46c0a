"""cloudckpt: PyTorch Distributed Checkpoint storage for S3, GCS and local disk.

Quick use::

    import cloudckpt
    cloudckpt.save(state_dict, "s3://bucket/run/step-100")
    cloudckpt.load(state_dict, "s3://bucket/run/step-100")
"""

from cloudckpt._version import __version__
from cloudckpt.api import AsyncSaveResponse, async_save, load, save, storage_reader, storage_writer
from cloudckpt.errors import (
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
from cloudckpt.executors import ProcessCheckpointExecutor, ThreadCheckpointExecutor
from cloudckpt.manager import CheckpointManager
from cloudckpt.reader import (
    CloudStorageReader,
    GCSStorageReader,
    LocalStorageReader,
    S3StorageReader,
)
from cloudckpt.staging import Stager
from cloudckpt.transfer import TransferOptions
from cloudckpt.uri import StorageURI, parse_uri
from cloudckpt.verify import verify
from cloudckpt.writer import (
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
