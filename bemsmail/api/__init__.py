"""The HTTP API: registrations, health, metrics, OpenAPI, with RFC 9457 problem documents for every error."""
