"""File-system primitives: atomic writes and work folders, locks, hashing, progress, typed JSON records."""
