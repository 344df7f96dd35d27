-- GET /v1/conversations/{id}: a random target per request (many accounts, each with its token).
local bench = require("bench")  -- wrk runs in this directory: ./bench.lua

local requests

setup = bench.setup
done = bench.done

function init(args)
    bench.seed_random()
    requests = bench.get_requests(bench.targets(bench.accounts()))
end

function request()
    return bench.pick(requests)
end
