"""Benchmarks for cloudckpt against the tools people use today.

Run ``python -m benchmarks.run --help``; results and how to read them are in
``docs/benchmarks.md``. Everything runs on 127.0.0.1: the servers are started
by the benchmark itself and every measured operation runs in a fresh child
process.
"""
