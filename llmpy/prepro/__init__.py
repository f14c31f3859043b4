"""Raw text -> llm.c token files."""
