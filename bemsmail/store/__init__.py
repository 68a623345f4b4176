"""Durable state in SQL: SQLite (embedded default) or MySQL/MariaDB, one schema, one set of migrations."""
