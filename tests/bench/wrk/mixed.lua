-- Mixed load: 80% GET by id, 10% POST (new contacts), 10% PUT (toggle is_muted).
local bench = require("bench")  -- wrk runs in this directory: ./bench.lua

local accounts, targets, reads

setup = bench.setup
done = bench.done

function init(args)
    bench.seed_random()
    accounts = bench.accounts()
    targets = bench.targets(accounts)
    reads = bench.get_requests(targets)
end

function request()
    local roll = math.random(10)
    if roll <= 8 then
        return bench.pick(reads)
    elseif roll == 9 then
        return bench.create(accounts)
    end
    return bench.update(targets)
end
