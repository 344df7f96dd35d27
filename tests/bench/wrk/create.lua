-- POST /v1/conversations: a new contact every time, in a random account. With `keyed` after
-- `--` on wrk's command line, each POST carries an Idempotency-Key of its own.
local bench = require("bench")  -- wrk runs in this directory: ./bench.lua

local accounts, keyed

setup = bench.setup
done = bench.done

function init(args)
    bench.seed_random()
    accounts = bench.accounts()
    keyed = args[1] == "keyed"
end

function request()
    return bench.create(accounts, keyed)
end
