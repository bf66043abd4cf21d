"""The benchmarks, part of the package so that ``ingestor bench`` runs from an installed
package as from a checkout (docs/benchmarks.md).

``ingestor bench`` runs the stages in pipeline order (``decode``, ``aggregate``, ``copy``,
``schema``, ``replay``, ``startup``, ``live``, ``recovery``, ``orders``): each stage's module
exposes ``TITLE`` and ``run(quick) -> list[dict]``, the rows of its table.  Every module also
runs alone, ``python -m ingestor.benchmarks.<name>``, with the options its docstring lists;
those not in ``ingestor bench`` (``storage``, ``reads``, ``compat``, ``jetstream``, ``simserver``)
run only that way.  :mod:`~ingestor.benchmarks.common` holds what they share (medians,
tables, scratch databases).

Whatever needs a source checkout stays an option: ``--baseline DIR`` (``storage``,
``reads``) runs another checkout's ``ingestor`` beside this package's.
"""
