-- wrk script for bench/serve_bench.sh, scenario 2b: every 20th request of each wrk thread
-- asks the built-in worker (and the baselines) to burn 20 ms of CPU; the rest are tiny. Each
-- request is on a new connection, like the rest of the benchmark.
local count = 0

request = function()
  count = count + 1
  local path = "/"
  if count % 20 == 0 then
    path = "/burn?ms=20"
  end
  return wrk.format("GET", path, { ["Connection"] = "close" })
end
