"""The SQLite ledger: `migrations` (the schema) and `store` (one writer thread, readers for the CLI)."""
