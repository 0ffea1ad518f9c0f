"""Benchmark harness and the Ollama emulator it (and the test suite) runs against."""
