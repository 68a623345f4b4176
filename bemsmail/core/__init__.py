"""The pure core of bemsmail: domain types, ports and decisions; it imports no I/O library."""
