"""Records and their ids, checked Parquet I/O, streaming sinks, and the prompt/response encoding."""
