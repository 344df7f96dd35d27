-- POST /v1/conversations as create.lua does, each with a new Idempotency-Key.
local bench = require("bench")  -- wrk runs in this directory: ./bench.lua

local accounts

setup = bench.setup
done = bench.done

function init(args)
    bench.seed_random()
    accounts = bench.accounts()
end

function request()
    return bench.create(accounts, true)
end
