"""SOL library package."""
