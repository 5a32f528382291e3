"""Serving: requests from many threads micro-batched into heterogeneous batches of one `generate` call, each caller
getting its own row ([`BatchingGenerator`], in `batching`)."""

from ..errors import GenerationTimeoutError, GeneratorClosedError
from .batching import BatchingGenerator, GenerationResult

__all__ = ["BatchingGenerator", "GenerationResult", "GenerationTimeoutError", "GeneratorClosedError"]
