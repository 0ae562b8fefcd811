-- wrk script: a weighted route mix like the bench's request_aware scenario,
-- and a per-backend count from the x-foretell-backend response header.
--
--   wrk -t1 -c32 -d10s -s bench/wrk/mix.lua http://127.0.0.1:8080
--
-- wrk is closed-loop (each connection waits for its answer before sending
-- again), so a stalled proxy slows the client down and hides its own tail;
-- use `foretell bench run` (open-loop) for latency claims.

local routes = {
  { path = "/search?q=wrk", weight = 6 },
  { path = "/render/page", weight = 3 },
  { path = "/api/item", weight = 1 },
}

local total = 0
for _, r in ipairs(routes) do total = total + r.weight end

counts = {}  -- global: done() reads it from each thread with t:get
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
  counts = {}
end

function request()
  local x = math.random() * total
  for _, r in ipairs(routes) do
    x = x - r.weight
    if x <= 0 then return wrk.format("GET", r.path) end
  end
  return wrk.format("GET", routes[#routes].path)
end

function response(status, headers, body)
  local backend = headers["x-foretell-backend"] or headers["x-backend-id"] or "?"
  counts[backend] = (counts[backend] or 0) + 1
end

function done(summary, latency, requests)
  local merged = {}
  for _, t in ipairs(threads) do
    local c = t:get("counts")
    if c then
      for k, v in pairs(c) do merged[k] = (merged[k] or 0) + v end
    end
  end
  io.write("requests per backend:\n")
  for k, v in pairs(merged) do
    io.write(string.format("  %-24s %d\n", k, v))
  end
end
