-- GET /v1/conversations?limit=10: the first page of the large account.
local bench = require("bench")  -- wrk runs in this directory: ./bench.lua

local first_page

setup = bench.setup
done = bench.done

function init(args)
    first_page = bench.get(bench.accounts()[1], "/v1/conversations?limit=10")
end

function request()
    return first_page
end
