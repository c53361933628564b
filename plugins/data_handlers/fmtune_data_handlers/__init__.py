"""fmtune data handlers plugin (entry point ``data_handlers``)."""

__version__ = "0.1.0"
