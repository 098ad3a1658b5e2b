"""Training text: sources, memory-mapped stores, chat formatting and the block layout."""
