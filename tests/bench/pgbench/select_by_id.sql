-- GET /v1/conversations/{id} as pgbench runs it: the service's SELECT (repository.SELECT_BY_ID)
-- for a random one of the same targets. pgbench cannot read ids from a file, so the statement
-- joins bench_targets (a 20,000-row copy of targets.txt, always in cache) to pick row :n: one
-- round trip, one extra index probe.
\set n random(1, :targets)
SELECT c.id, c.contact_id, c.group_id, c.pinned_message_id, c.is_pinned, c.is_muted,
       c.last_active_at, c.last_opened_at, c.created_at, c.archived_at, c.version
FROM bench_targets t
JOIN conversations c ON c.account_id = t.account_id AND c.id = t.id
WHERE t.n = :n;
