-- PUT /v1/conversations/{id} with {"is_muted": <the opposite of its state>}: every request a
-- real change (a version bump and an event).
local bench = require("bench")  -- wrk runs in this directory: ./bench.lua

local targets

setup = bench.setup
done = bench.done

function init(args)
    bench.seed_random()
    targets = bench.targets(bench.accounts())
end

function request()
    return bench.update(targets)
end
