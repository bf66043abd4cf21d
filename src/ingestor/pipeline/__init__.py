"""The synchronous pipeline around the compiled core: decode -> aggregate -> encode into
``FlushBatch``es (``pipeline``), the tables' COPY specs (``tables``, ``copyspec``), the
engine's restart state (``state``), and ``replay`` of a capture."""

from ingestor.pipeline.pipeline import FlushBatch, Pipeline, PipelineSettings

__all__ = ["FlushBatch", "Pipeline", "PipelineSettings"]
