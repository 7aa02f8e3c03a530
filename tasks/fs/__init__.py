"""File-system primitives: atomic writes, locks, hashing, typed JSON records."""
