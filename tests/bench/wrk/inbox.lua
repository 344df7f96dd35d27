-- GET /v1/conversations?limit=10&sort=-last_active_at on the large account, as an inbox pages
-- it. The page is the argument after `--` on wrk's command line: `first`; `deep` (starting_after
-- a random cursor among the last of the activity order); `metadata` (metadata[segment]=vip,
-- about 1% of the account); `unread` (unread=true).
local bench = require("bench")  -- wrk runs in this directory: ./bench.lua

local INBOX = "/v1/conversations?limit=10&sort=-last_active_at"
local FILTERS = {first = "", metadata = "&metadata%5Bsegment%5D=vip", unread = "&unread=true"}
local requests = {}

setup = bench.setup
done = bench.done

function init(args)
    bench.seed_random()
    local large = bench.accounts()[1]
    local page = args[1] or error("inbox.lua: name the page after --: first, deep, metadata, unread")
    if page == "deep" then
        for i, cursor in ipairs(bench.activity_cursors()) do
            requests[i] = bench.get(large, INBOX .. "&starting_after=" .. cursor)
        end
    else
        local filter = FILTERS[page] or error("inbox.lua: no page " .. page)
        requests[1] = bench.get(large, INBOX .. filter)
    end
end

function request()
    return bench.pick(requests)
end
