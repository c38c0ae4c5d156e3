"""AUTOMATIC1111's prompt language: the grammar (syntax), 75-token chunking with BREAK and
embeddings by name (chunks), and prompt editing over steps (schedule)."""
