"""Content-defined chunking for delta downloads of large artifacts.

The producer (registry) cuts a blob into chunks with :func:`chunk_file` and publishes the
:class:`ChunkManifest`; chunks are content-addressed (``sha256:<hex>``), so identical regions of
two model variants become identical chunks. A consumer (gateway) holding an older variant indexes
it (:func:`index_local_chunks`), asks :func:`plan_fetch` which chunks it lacks, fetches only those
and rebuilds the blob with :func:`assemble`, which verifies every chunk and the whole blob.
"""

from slmops.chunking.chunker import chunk_file
from slmops.chunking.delta import FetchPlan, assemble, index_local_chunks, plan_fetch
from slmops.chunking.gear import ALGORITHM
from slmops.chunking.manifest import (
    DEFAULT_AVG_SIZE_BYTES,
    DEFAULT_MAX_SIZE_BYTES,
    DEFAULT_MIN_SIZE_BYTES,
    Chunk,
    ChunkerParams,
    ChunkIntegrityError,
    ChunkManifest,
    ChunkManifestError,
)

__all__ = [
    "ALGORITHM",
    "DEFAULT_AVG_SIZE_BYTES",
    "DEFAULT_MAX_SIZE_BYTES",
    "DEFAULT_MIN_SIZE_BYTES",
    "Chunk",
    "ChunkIntegrityError",
    "ChunkManifest",
    "ChunkManifestError",
    "ChunkerParams",
    "FetchPlan",
    "assemble",
    "chunk_file",
    "index_local_chunks",
    "plan_fetch",
]
