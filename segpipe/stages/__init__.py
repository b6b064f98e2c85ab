"""The five stages, one folder each: ingest, train, predict, export, evaluate.

Each stage's ``__init__`` names its public functions; :mod:`segpipe` wraps them as the
Python API and :mod:`segpipe.cli` as the ``segpipe`` command.
"""
