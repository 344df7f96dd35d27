-- GET /v1/conversations?limit=10&starting_after=<cursor>: a page near the end of the large
-- account (a random cursor among its oldest ids, each with a full page after it).
local bench = require("bench")  -- wrk runs in this directory: ./bench.lua

local requests = {}

setup = bench.setup
done = bench.done

function init(args)
    bench.seed_random()
    local large = bench.accounts()[1]
    for i, cursor in ipairs(bench.cursors()) do
        requests[i] = bench.get(large, "/v1/conversations?limit=10&starting_after=" .. cursor)
    end
end

function request()
    return bench.pick(requests)
end
