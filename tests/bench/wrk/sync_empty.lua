-- GET /v1/conversations/changes?since=<token>: an incremental sync of the large account with
-- nothing changed since the token (sync_token.txt, written by the harness after a full walk).
local bench = require("bench")  -- wrk runs in this directory: ./bench.lua

local sync

setup = bench.setup
done = bench.done

function init(args)
    local token = bench.lines("sync_token.txt")[1]
    sync = bench.get(bench.accounts()[1], "/v1/conversations/changes?since=" .. token)
end

function request()
    return sync
end
