"""Chat data: record formats, chat-template encoding with assistant-only labels, the Arrow cache,
weighted epochs, packing into micro-batches, and ``philora data check``. No model here."""
