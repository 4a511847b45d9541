"""Generation engines (transformers, vLLM, OpenAI-compatible) behind one interface, and resumable shards."""
