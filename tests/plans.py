"""Reading PostgreSQL's JSON plans (EXPLAIN (FORMAT JSON)) in tests."""

import itertools


def plan_nodes(plan: dict, *, without: str | None = None) -> list[dict]:
    """The plan node and every node under it, depth first; without the subtrees in the
    `without` relationship to their parent (e.g. "InitPlan": subqueries run once, before)."""
    children = [c for c in plan.get("Plans", []) if c.get("Parent Relationship") != without]
    nested = (plan_nodes(child, without=without) for child in children)
    return [plan, *itertools.chain.from_iterable(nested)]
