-- wrk script for bench/serve_bench.sh, scenario 2b: 5% of requests ask the built-in worker
-- (and the baselines) to burn 20 ms of CPU; the rest are tiny. Each request is on a new
-- connection, like the rest of the benchmark. The burning ones are drawn at random (fixed
-- seed): a fixed "every 20th" pattern would, under round robin over 2 workers, send every
-- burn to the same worker.
math.randomseed(20261126)

request = function()
  local path = "/"
  if math.random() < 0.05 then
    path = "/burn?ms=20"
  end
  return wrk.format("GET", path, { ["Connection"] = "close" })
end
