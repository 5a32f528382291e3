"""Serving: requests from many threads micro-batched into heterogeneous batches of one `generate` call, each caller
getting its own row ([`BatchingGenerator`], in `batching`)."""

from .batching import BatchingGenerator, GenerationResult, GenerationTimeoutError, GeneratorClosedError

__all__ = ["BatchingGenerator", "GenerationResult", "GenerationTimeoutError", "GeneratorClosedError"]
