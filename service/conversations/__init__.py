"""The domain: conversation operations, their raw SQL, ids, and the outbox row each write
records in the same statement. Knows nothing of HTTP (`service.api`) or of the broker
(`service.events`)."""
