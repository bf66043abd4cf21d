"""Pure-Python twins of the compiled core's kernels: the test oracles."""
