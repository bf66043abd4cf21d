"""Pure-Python twins of the compiled kernels: the test oracles.

Each twin does with ``struct`` and plain Python what a kernel of
``ingestor._core`` does in C, written for clarity rather than speed, so the
tests can check the compiled code against an independent reading of the same
specification: ``frames`` (the Kite frame decoder, and a faithful Kite frame
encoder), ``candles`` (the aggregation engine), ``copy`` (the binary COPY
encoder).
"""
