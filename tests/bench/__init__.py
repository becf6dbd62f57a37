"""Benchmark programs and their GPU scripts: run by hand or by `./build.sh bench|eval`,
never collected by pytest (no `test_*.py` here). See README.md in this folder."""
