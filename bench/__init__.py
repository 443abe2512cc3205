"""Benchmarks: micro (compiled vs pure Python) and the system benches of DESIGN section 9."""
