"""Key files: format, reading and writing with permissions, generation."""
