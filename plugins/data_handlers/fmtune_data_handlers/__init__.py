"""fmtune data handlers plugin (entry point ``data_handlers``).

For handler plugins: ``RecordError(index_in_batch, problem)`` refuses one record of a batch
(fmtune names its file and line); ``DataError`` is the core's (``fmtune.records.DataError``).
"""

from .loading import DataError, RecordError

__version__ = "0.1.0"
__all__ = ["DataError", "RecordError", "__version__"]
