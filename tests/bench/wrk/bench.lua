-- Shared by the wrk scripts of tests/bench: the files the harness writes at seed time, the
-- requests, and the JSON summary that tests/bench/load.py reads from wrk's stdout. The harness
-- runs wrk with this directory as its working directory, so `require("bench")` finds it.
--
-- Environment: BENCH_DATA_DIR (tokens.txt, targets.txt, cursors.txt, activity_cursors.txt), BENCH_TAG (unique per
-- wrk run: new contact ids never collide with an earlier run's), BENCH_THREADS (wrk's -t).
local M = {}

local function data_lines(name)
    local dir = os.getenv("BENCH_DATA_DIR") or error("BENCH_DATA_DIR is not set")
    local lines = {}
    for line in io.lines(dir .. "/" .. name) do
        lines[#lines + 1] = line
    end
    return lines
end

-- accounts[i] = {id = ..., auth = "Bearer ..."}; accounts[1] is the large account.
function M.accounts()
    local accounts = {}
    for _, line in ipairs(data_lines("tokens.txt")) do
        local id, token = line:match("^(%S+) (%S+)$")
        accounts[#accounts + 1] = {id = id, auth = "Bearer " .. token}
    end
    return accounts
end

-- targets[i] = {account = <an entry of accounts>, id = <conversation id>}
function M.targets(accounts)
    local targets = {}
    for _, line in ipairs(data_lines("targets.txt")) do
        local account, id = line:match("^(%d+) (%S+)$")
        targets[#targets + 1] = {account = accounts[tonumber(account)], id = id}
    end
    return targets
end

function M.cursors()
    return data_lines("cursors.txt")
end

-- Any other file the harness wrote into BENCH_DATA_DIR, one entry a line.
M.lines = data_lines

-- Opaque cursors of sort=-last_active_at near the end of the large account's activity order.
function M.activity_cursors()
    return data_lines("activity_cursors.txt")
end

-- X-Account-ID is for the minimal baseline only, which has no auth: the others ignore it.
function M.get(account, path)
    return wrk.format("GET", path, {Authorization = account.auth, ["X-Account-ID"] = account.id})
end

local function send_json(method, account, path, body, key)
    return wrk.format(method, path, {
        Authorization = account.auth,
        ["Content-Type"] = "application/json",
        ["Idempotency-Key"] = key,  -- nil: no such header
    }, body)
end

-- GET /v1/conversations/{id} for every target, formatted once: request() only picks one.
function M.get_requests(targets)
    local requests = {}
    for i, target in ipairs(targets) do
        requests[i] = M.get(target.account, "/v1/conversations/" .. target.id)
    end
    return requests
end

function M.pick(list)
    return list[math.random(#list)]
end

-- setup() runs in wrk's main Lua state once per thread, just before that thread's init():
-- number the threads.
local threads = 0
function M.setup(thread)
    threads = threads + 1
    thread:set("thread_number", threads)
end

-- In a thread's init(): seed its generator apart from the other threads'.
function M.seed_random()
    math.randomseed(os.time() * 100 + thread_number)
    math.random()
end

-- POST /v1/conversations for a contact never seen before: tag, thread and a counter. With
-- `keyed`, an Idempotency-Key as new as the contact (the first try of a write, never a replay).
local created = 0
function M.create(accounts, keyed)
    created = created + 1
    local contact = string.format("b%st%dn%d", os.getenv("BENCH_TAG") or "x", thread_number, created)
    return send_json("POST", M.pick(accounts), "/v1/conversations",
        '{"contact_id":"' .. contact .. '"}', keyed and ("key-" .. contact) or nil)
end

-- PUT /v1/conversations/{id} toggling is_muted. A thread only updates its own share of the
-- targets (every BENCH_THREADS-th one), so it knows each one's state: the harness sets
-- is_muted=false on all targets before the run, and the thread remembers what it set since.
local owned, muted = nil, {}
function M.update(targets)
    if owned == nil then
        owned = {}
        local step = tonumber(os.getenv("BENCH_THREADS")) or error("BENCH_THREADS is not set")
        for i = thread_number, #targets, step do
            owned[#owned + 1] = targets[i]
        end
    end
    local target = M.pick(owned)
    local value = not muted[target.id]
    muted[target.id] = value
    return send_json("PUT", target.account, "/v1/conversations/" .. target.id,
        '{"is_muted":' .. tostring(value) .. '}')
end

-- done(): one line `BENCH_RESULT {...}`; latencies in microseconds.
function M.done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'BENCH_RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,'
            .. '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_timeout":%d,'
            .. '"errors_status":%d}\n',
        summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
        latency.max, e.connect, e.read, e.write, e.timeout, e.status))
end

return M
