"""The API's write path under load and outages: group commit (batching), feedback rate limits,
and the local spool with its outbox when Postgres cannot take a write."""
