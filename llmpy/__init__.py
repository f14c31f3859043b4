"""llm.py: GPT-2 training in simple, fast Python, with every backward pass written by hand."""
__version__ = "0.1.0"
