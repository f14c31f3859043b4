"""PyTorch reference implementations, kept apart from llmpy (whose runtime never imports torch).
Used by the tests, the benchmarks and the commands that compare against PyTorch."""
