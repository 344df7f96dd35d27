"""The inbox list: both orders walked both ways with every filter, cursors, concurrent activity,
other tenants, refused queries, and the plans PostgreSQL runs for a large account."""

import asyncio
import base64
import itertools
import random
from collections.abc import Callable
from urllib.parse import urlencode

import orjson
import pytest

from schemas.cursor import Position, Sort, encode
from service.conversations import repository
from service.conversations.repository import ListFilter
from tests.error_bodies import error_body
from tests.plans import plan_nodes

URL = "/v1/conversations"
ACTIVITY = "-last_active_at"
# Positions past the end of each order: the lowest key there is.
END = {
    "-created_at": "0" * 16,
    ACTIVITY: encode(Sort.ACTIVITY, Position("0" * 16, None)),
}


def activity_key(conversation: dict) -> tuple:
    """Last activity first, never-active (null) after all others, ties by id descending."""
    time = conversation["last_active_at"]
    return (-1 if time is None else time, conversation["id"].encode())


def in_order(conversations: list[dict], sort: str) -> list[str]:
    if sort == ACTIVITY:
        ordered = sorted(conversations, key=activity_key, reverse=True)
    else:
        ordered = sorted(conversations, key=lambda c: c["id"].encode(), reverse=True)
    return [c["id"] for c in ordered]


async def page(client, headers, **query) -> dict:
    resp = await client.get(f"{URL}?{urlencode(query)}", headers=headers)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def walk(
    client,
    headers,
    query: dict,
    *,
    limit: int,
    backwards: bool = False,
    between: Callable | None = None,
) -> list[str]:
    """Every id of one walk, in list order: forwards from the start with `cursors.after`, or
    backwards from past the end with `cursors.before`. Checks each page's shape on the way."""
    sort = query.get("sort", "-created_at")
    params = {**query, "limit": limit}
    if backwards:
        params["ending_before"] = END[sort]
    pages = []
    while True:
        body = await page(client, headers, **params)
        ids = [c["id"] for c in body["data"]]
        assert len(ids) <= limit
        if ids:
            first, last = body["data"][0], body["data"][-1]
            assert body["cursors"] == {
                "before": encode(Sort(sort), Position(first["id"], first["last_active_at"])),
                "after": encode(Sort(sort), Position(last["id"], last["last_active_at"])),
            }
        else:
            assert body["cursors"] == {"before": None, "after": None}
        pages.append(ids)
        if between is not None:
            await between()
        if not body["has_more"]:
            break
        assert len(ids) == limit
        if backwards:
            params = {**query, "limit": limit, "ending_before": body["cursors"]["before"]}
        else:
            params = {**query, "limit": limit, "starting_after": body["cursors"]["after"]}
    if backwards:
        pages.reverse()
    return list(itertools.chain.from_iterable(pages))


async def seed(client, headers, count: int = 26) -> list[dict]:
    """Conversations with ties, a null group, unread and read ones, metadata, flags."""
    rng = random.Random(7)
    made = []
    for n in range(count):
        active = None if n % 5 == 0 else 1_700_000_000 + rng.choice([0, 10, 10, 20, 30, 40]) * n
        opened = None if active is None or n % 3 == 0 else active - (n % 2) * 5
        body = {
            "contact_id": f"c{n}",
            "last_active_at": active,
            "last_opened_at": opened,
            "is_muted": n % 4 == 0,
            "is_pinned": n % 6 == 1,
            "metadata": {"team": "sales" if n % 3 else "support"} | ({"vip": "1"} if n % 4 else {}),
        }
        resp = await client.post(URL, json=body, headers=headers)
        assert resp.status == 201, await resp.text()
        made.append(await resp.json())
    for conversation in made[2::7]:
        resp = await client.patch(
            f"{URL}/{conversation['id']}", json={"archived_at": 1_700_000_000}, headers=headers
        )
        conversation.update(await resp.json())
    return made


def unread(c: dict) -> bool:
    active, opened = c["last_active_at"], c["last_opened_at"]
    return active is not None and (opened is None or opened < active)


FILTERS: list[tuple[dict, Callable[[dict], bool]]] = [
    ({}, lambda c: True),
    ({"unread": "true"}, unread),
    ({"unread": "false"}, lambda c: not unread(c)),
    ({"metadata[team]": "sales"}, lambda c: c["metadata"].get("team") == "sales"),
    (
        {"metadata[team]": "sales", "metadata[vip]": "1"},
        lambda c: c["metadata"] == {"team": "sales", "vip": "1"},
    ),
    ({"metadata[team]": "nobody"}, lambda c: False),
    (
        {"unread": "true", "metadata[vip]": "1", "archived": "false"},
        lambda c: unread(c) and c["metadata"].get("vip") == "1" and c["archived_at"] is None,
    ),
    ({"archived": "true", "unread": "false"}, lambda c: c["archived_at"] and not unread(c)),
    (
        {"muted": "true", "metadata[team]": "support"},
        lambda c: (
            c["is_muted"] and "vip" not in c["metadata"] and c["metadata"]["team"] == "support"
        ),
    ),
    ({"pinned": "false", "unread": "true"}, lambda c: not c["is_pinned"] and unread(c)),
    ({"contact_id": "c7", "unread": "true"}, lambda c: c["contact_id"] == "c7" and unread(c)),
]


@pytest.mark.parametrize("sort", ["-created_at", ACTIVITY])
async def test_walks_both_ways_with_every_filter(client, headers, sort):
    made = await seed(client, headers)
    assert any(c["last_active_at"] is None for c in made)
    for query, keep in FILTERS:
        query = {**query, "sort": sort}
        expected = in_order([c for c in made if keep(c)], sort)
        for limit in (1, 4, 100):
            forwards = await walk(client, headers, query, limit=limit)
            assert forwards == expected, (query, limit)
            backwards = await walk(client, headers, query, limit=limit, backwards=True)
            assert backwards == expected, (query, limit)


async def test_the_default_order_is_v1s_and_an_explicit_sort_changes_nothing(client, headers):
    made = await seed(client, headers, 8)
    assert await page(client, headers) == await page(client, headers, sort="-created_at")
    body = await page(client, headers, limit=3)
    assert [c["id"] for c in body["data"]] == in_order(made, "-created_at")[:3]
    assert body["cursors"] == {"before": body["data"][0]["id"], "after": body["data"][2]["id"]}


async def test_never_active_conversations_come_last_in_both_directions(client, headers):
    active = [
        await client.post(
            URL, json={"contact_id": f"a{n}", "last_active_at": 1_800_000_000 - n}, headers=headers
        )
        for n in range(3)
    ]
    idle = [await client.post(URL, json={"contact_id": f"i{n}"}, headers=headers) for n in range(4)]
    active_ids = [(await r.json())["id"] for r in active]
    idle_ids = sorted([(await r.json())["id"] for r in idle], reverse=True)
    expected = active_ids + idle_ids
    query = {"sort": ACTIVITY}
    for limit in (1, 2, 3, 5):
        assert await walk(client, headers, query, limit=limit) == expected
        assert await walk(client, headers, query, limit=limit, backwards=True) == expected
    # From inside the null group: the next page stays in it, the previous one crosses back.
    body = await page(client, headers, limit=2, sort=ACTIVITY, starting_after=_cursor(idle_ids[0]))
    assert [c["id"] for c in body["data"]] == idle_ids[1:3]
    body = await page(client, headers, limit=2, sort=ACTIVITY, ending_before=_cursor(idle_ids[1]))
    assert [c["id"] for c in body["data"]] == [active_ids[2], idle_ids[0]]
    assert body["has_more"] is True


def _cursor(conversation_id: str, time: int | None = None) -> str:
    return encode(Sort.ACTIVITY, Position(conversation_id, time))


def _b64(text: bytes) -> str:
    return base64.urlsafe_b64encode(text).rstrip(b"=").decode()


async def test_pages_past_either_end_are_empty_under_the_activity_order(client, headers):
    await seed(client, headers, 4)
    empty = {"has_more": False, "data": [], "cursors": {"before": None, "after": None}}
    assert await page(client, headers, sort=ACTIVITY, starting_after=END[ACTIVITY]) == empty
    top = _cursor("z" * 16, 253402300799)
    assert await page(client, headers, sort=ACTIVITY, ending_before=top) == empty
    assert (await page(client, headers, sort=ACTIVITY))["data"]


async def test_a_walk_returns_each_conversation_that_kept_its_place_exactly_once(client, headers):
    """Activity changes under the walk (between pages and during each request): the others are
    returned once each, in order (a moved one may be returned at any of its places, or none)."""
    made = await seed(client, headers, 30)
    movers = {c["id"] for c in made[1::4]}
    stayers = [c for c in made if c["id"] not in movers]
    clock = itertools.count(1_900_000_000)
    stop = asyncio.Event()
    moved = asyncio.Event()

    async def keep_moving() -> None:
        rng = random.Random(3)
        while not stop.is_set():
            mover = rng.choice(sorted(movers))
            # Up to the top, or down into the null group.
            value = None if rng.random() < 0.3 else next(clock)
            resp = await client.patch(
                f"{URL}/{mover}", json={"last_active_at": value}, headers=headers
            )
            assert resp.status == 200
            moved.set()
            await asyncio.sleep(0)  # a turn for the walk

    for backwards, limit in [(False, 3), (True, 4), (False, 1), (True, 2)]:
        for query in ({"sort": ACTIVITY}, {"sort": ACTIVITY, "unread": "false"}):
            stop.clear()
            mover_task = asyncio.create_task(keep_moving())

            async def let_them_move() -> None:  # between two pages, at least one move
                moved.clear()
                async with asyncio.timeout(20):
                    await moved.wait()

            try:
                seen = await walk(
                    client, headers, query, limit=limit, backwards=backwards, between=let_them_move
                )
            finally:
                stop.set()
                await mover_task
            stayed = [c for c in stayers if query.get("unread") != "false" or not unread(c)]
            assert [i for i in seen if i not in movers] == in_order(stayed, ACTIVITY)


async def test_another_tenants_cursor_is_only_a_position(client, headers, make_token):
    mine = await seed(client, headers, 6)
    other = {"Authorization": f"Bearer {make_token('acct_other_tenant')}"}
    theirs = await seed(client, other, 6)
    their_page = await page(client, other, sort=ACTIVITY, limit=2)
    for direction in ("starting_after", "ending_before"):
        body = await page(
            client, headers, sort=ACTIVITY, limit=100, **{direction: their_page["cursors"]["after"]}
        )
        ids = [c["id"] for c in body["data"]]
        assert not set(ids) & {c["id"] for c in theirs}
        # Exactly what the position alone selects among mine.
        last = their_page["data"][-1]
        key = activity_key(last)
        expected = [
            i
            for i in in_order(mine, ACTIVITY)
            if (activity_key(next(c for c in mine if c["id"] == i)) < key)
            == (direction == "starting_after")
        ]
        assert ids == expected


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"sort": "last_active_at"}, "sort"),
        ({"sort": "-id"}, "sort"),
        ({"sort": ACTIVITY, "starting_after": "0" * 16}, "starting_after"),
        ({"starting_after": _cursor("0" * 16, 5)}, "starting_after"),
        ({"ending_before": _cursor("0" * 16)}, "ending_before"),
        ({"sort": ACTIVITY, "ending_before": "not a cursor"}, "ending_before"),
        ({"sort": ACTIVITY, "starting_after": _cursor("0" * 16, 5) + "="}, "starting_after"),
        ({"sort": ACTIVITY, "starting_after": _cursor("0" * 16, 5)[:-2]}, "starting_after"),
        (
            {"sort": ACTIVITY, "starting_after": _b64(b"a253402300800.0000000000000000")},
            "starting_after",
        ),
        ({"sort": ACTIVITY, "starting_after": _b64(b"a01.0000000000000000")}, "starting_after"),
        ({"sort": ACTIVITY, "starting_after": _b64(b"c1.0000000000000000")}, "starting_after"),
        ({"sort": ACTIVITY, "starting_after": _b64(b"a1.000000000000000!")}, "starting_after"),
        ({"sort": ACTIVITY, "starting_after": "A" * 200}, "starting_after"),
        ({"unread": "yes"}, "unread"),
        ({"metadata[team]": ""}, "metadata"),
        ({"metadata[bad key]": "x"}, "metadata"),
        ({"metadata": "x"}, "metadata"),
        ({f"metadata[k{n}]": "v" for n in range(6)}, "metadata"),
    ],
)
async def test_refused_queries(client, headers, query, param):
    resp = await client.get(f"{URL}?{urlencode(query)}", headers=headers)
    await error_body(resp, 422, "validation_error", param=param)


async def test_a_wrong_order_cursor_says_which_order_it_belongs_to(client, headers):
    resp = await client.get(
        f"{URL}?{urlencode({'starting_after': _cursor('0' * 16)})}", headers=headers
    )
    body = await error_body(resp, 422, "validation_error", param="starting_after")
    assert "sort=-last_active_at" in body["errors"]["starting_after"][0]
    resp = await client.get(f"{URL}?sort={ACTIVITY}&ending_before={'0' * 16}", headers=headers)
    body = await error_body(resp, 422, "validation_error", param="ending_before")
    assert "sort=-created_at" in body["errors"]["ending_before"][0]


async def test_five_metadata_filters_must_all_hold(client, headers):
    labels = {f"k{n}": "v" for n in range(5)}
    full = await client.post(URL, json={"contact_id": "c1", "metadata": labels}, headers=headers)
    partial = {**labels, "k4": "other"}
    await client.post(URL, json={"contact_id": "c2", "metadata": partial}, headers=headers)
    query = {f"metadata[{key}]": value for key, value in labels.items()}
    body = await page(client, headers, **query)
    assert [c["id"] for c in body["data"]] == [(await full.json())["id"]]


# --- plans on a large account -------------------------------------------------------------------

LARGE = "acct_large"
# Indexes that find few rows, so a sort of what they find is a sort of few rows.
_SELECTIVE = {
    "conversations_account_contact_key",
    "conversations_account_group_key",
}
# A metadata-filtered page walks the first pair's labels in the order's index, and reads each
# labelled conversation by its key.
_LABELS = {
    Sort.CREATED: "conversation_labels_pkey",
    Sort.ACTIVITY: "conversation_labels_activity_idx",
}


async def test_plans_never_sort_the_account_nor_scan_it_whole(db):
    """20,000 conversations in one account (and 20,000 in others): every order, direction,
    filter and depth is an index range scan in the order's index, or a sort of only what a
    selective index (a contact, a group, a rare metadata value) found. Never OFFSET."""
    await repository.init_connection(db)
    await db.execute(
        """
        INSERT INTO conversations (account_id, id, contact_id, is_pinned, is_muted,
                                   last_active_at, last_opened_at, created_at, archived_at,
                                   metadata)
        SELECT CASE WHEN n % 2 = 0 THEN $1 ELSE 'acct_' || (n % 50) END,
               lpad(to_hex(n), 16, '0'), 'ct_' || n, n % 31 = 0, n % 10 = 0,
               CASE WHEN n % 20 = 0 THEN NULL ELSE 1600000000 + n * 7 % 100000 END,
               CASE WHEN n % 20 = 0 OR n % 9 = 0 THEN NULL ELSE 1600000000 + n * 7 % 100000 END,
               1600000000 + n, CASE WHEN n % 17 = 0 THEN 1600000000 END,
               CASE WHEN n % 100 = 2 THEN '{"team": "sales"}'::jsonb
                    WHEN n % 10 = 4 THEN jsonb_build_object('tier', 't' || n % 7)
                    ELSE '{}' END
        FROM generate_series(1, 40000) AS n
        """,
        LARGE,
    )
    await db.execute("ANALYZE conversations, conversation_labels")  # as autovacuum does
    middle = Position(f"{20000:016x}", 1600050000)
    filters = [
        ListFilter(),
        ListFilter(unread=True),
        ListFilter(unread=False),
        ListFilter(archived=True),
        ListFilter(muted=False, pinned=False),
        ListFilter(metadata={"team": "sales"}),
        ListFilter(metadata={"tier": "t3"}),
        ListFilter(metadata={"team": "nobody"}),
        ListFilter(metadata={"tier": "t3"}, unread=True),
        ListFilter(metadata={"team": "sales", "tier": "t3"}),
        ListFilter(metadata={"team": "nobody", "tier": "t3"}, archived=False),
        ListFilter(contact_id="ct_20000", unread=False),
    ]
    checked = 0
    for sort, filters_, (after, before) in itertools.product(
        Sort, filters, [(None, None), (middle, None), (None, middle)]
    ):
        query, args = repository.list_query(
            LARGE, filters_, sort=sort, limit=11, after=after, before=before
        )
        assert "OFFSET" not in query.upper()
        plan = orjson.loads(await db.fetchval(f"EXPLAIN (FORMAT JSON) {query}", *args))[0]["Plan"]
        where = (sort, filters_, after, before)
        assert not [n for n in plan_nodes(plan) if n["Node Type"] == "Seq Scan"], (where, plan)
        # The walk itself: without the choice of the metadata pair it walks (an InitPlan that
        # sorts the filter's pairs by their capped counts).
        nodes = plan_nodes(plan, without="InitPlan")
        for sort_node in (n for n in nodes if n["Node Type"] == "Sort"):
            found_by = {n.get("Index Name") for n in plan_nodes(sort_node)} - {None}
            assert found_by, (where, plan)
            assert found_by <= _SELECTIVE, (where, plan)
        if filters_.metadata:
            scans = [n for n in nodes if "Index Name" in n]
            assert [n["Index Name"] for n in scans][:1] == [_LABELS[sort]], (where, plan)
            assert [n["Relation Name"] for n in scans] == [
                "conversation_labels",
                "conversations",
            ], (where, plan)
            assert {n["Node Type"] for n in scans} <= {"Index Scan", "Index Only Scan"}, plan
            assert [
                n["Node Type"]
                for n in nodes
                if "Join" in n["Node Type"] or "Loop" in n["Node Type"]
            ] == ["Nested Loop"], (where, plan)
            if len(filters_.metadata) > 1:  # each pair, probed before the row is read
                [lookup] = [n for n in nodes if n.get("Parent Relationship") == "Inner"]
                probes = [
                    n for n in plan_nodes(lookup) if n.get("Relation Name") == "conversation_labels"
                ]
                assert [n["Node Type"] for n in probes] == ["Index Only Scan"] * len(
                    filters_.metadata
                ), (where, plan)
            assert not [n for n in nodes if n["Node Type"] == "Sort"], (where, plan)
        elif filters_.contact_id is None:
            scans = [n for n in nodes if "Index Name" in n]
            assert [n["Node Type"] for n in scans] in (
                ["Index Scan"],
                ["Index Scan Backward"],
            ), (where, plan)
            assert not [n for n in nodes if n["Node Type"] == "Sort"], (where, plan)
        checked += 1
    assert checked == 2 * len(filters) * 3

    # Of several pairs, the walk takes the one with the fewest labels: here not team=sales (the
    # first in key order, 200 rows) but tier=nobody, which has none, so it reads no label.
    query, args = repository.list_query(
        LARGE,
        ListFilter(metadata={"team": "sales", "tier": "nobody"}),
        sort=Sort.ACTIVITY,
        limit=11,
    )
    analyzed = await db.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}", *args)
    plan = orjson.loads(analyzed)[0]["Plan"]
    [labels] = [
        n
        for n in plan_nodes(plan, without="InitPlan")
        if n.get("Relation Name") == "conversation_labels"
    ]
    assert labels["Actual Rows"] == 0, plan

    # Two pairs that never meet (every team=sales has no tier): each walked label is dropped by
    # a probe of the labels' primary key, and no conversation's row is read.
    query, args = repository.list_query(
        LARGE, ListFilter(metadata={"team": "sales", "tier": "t3"}), sort=Sort.ACTIVITY, limit=11
    )
    analyzed = await db.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}", *args)
    plan = orjson.loads(analyzed)[0]["Plan"]
    walked = plan_nodes(plan, without="InitPlan")
    [labels] = [n for n in walked if n.get("Index Name") == _LABELS[Sort.ACTIVITY]]
    sales = await db.fetchval(
        "SELECT count(*) FROM conversation_labels"
        " WHERE account_id = $1 AND key = 'team' AND value = 'sales'",
        LARGE,
    )
    assert labels["Actual Rows"] == sales, plan  # the rarer pair's labels, every one
    [row] = [n for n in walked if n.get("Relation Name") == "conversations"]
    assert row["Actual Loops"] == 0, plan
    # Each probe: the pair's one entry for that conversation, in the primary key.
    [lookup] = [n for n in plan_nodes(plan) if n.get("Parent Relationship") == "Inner"]
    probes = [n for n in plan_nodes(lookup) if n.get("Relation Name") == "conversation_labels"]
    assert {n["Index Name"] for n in probes} == {"conversation_labels_pkey"}, plan
    assert sum(n["Actual Loops"] for n in probes) == sales, plan  # tier's, team's short-cut
