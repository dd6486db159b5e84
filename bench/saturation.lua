-- wrk script for python -m bench saturation: POST tools/call with an id unique across threads,
-- count only answers that carry a result (an HTTP 200 is not enough), report them as JSON.
-- args: era ("2025" or "2026"), "show" or "quiet", then the session ids (2025 only): each request
-- takes the next session in turn, so every connection spreads its calls over all the sessions.
local threads = {}
era, counter, ok, bad, shown = "2025", 0, 0, 0, false  -- globals: done() reads them via thread:get
local sessions = {}
local bodies = {
  ["2025"] = '{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"get_current_time","arguments":{"timezone":"UTC"}}}',
  ["2026"] = '{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"get_current_time","arguments":{"timezone":"UTC"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}',
}

function setup(thread)
  thread:set("base", #threads * 100000000)
  table.insert(threads, thread)
end

function init(args)
  era = args[1] or "2025"
  show = args[2] == "show"
  counter = base
  for i = 3, #args do
    local headers = {}
    for name, value in pairs(wrk.headers) do headers[name] = value end
    headers["Mcp-Session-Id"] = args[i]
    table.insert(sessions, headers)
  end
end

function request()
  counter = counter + 1
  local headers = nil
  if #sessions > 0 then headers = sessions[counter % #sessions + 1] end
  return wrk.format("POST", nil, headers, string.format(bodies[era], counter))
end

function response(status, headers, body)
  if show and not shown then
    shown = true
    io.write("REPLY " .. status .. " " .. body:gsub("\n", "\\n") .. "\n")
  end
  if status == 200 and body:find('"result"', 1, true) and not body:find('"error"', 1, true) then
    ok = ok + 1
  else
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local good, wrong = 0, 0
  for _, thread in ipairs(threads) do
    good = good + thread:get("ok")
    wrong = wrong + thread:get("bad")
  end
  local errors = summary.errors
  io.write(string.format(
    '{"ok":%d,"bad":%d,"requests":%d,"non2xx":%d,"seconds":%f,"p50_us":%d,"p99_us":%d,"socket_errors":%d}\n',
    good, wrong, summary.requests, errors.status, summary.duration / 1e6,
    latency:percentile(50), latency:percentile(99),
    errors.connect + errors.read + errors.write + errors.timeout))
end
