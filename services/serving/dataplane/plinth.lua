-- Plinth's inference data plane, inside HAProxy 2.6 (Lua 5.3). Loaded with `lua-load`: one Lua
-- state shared by HAProxy's threads, so the tables below are the same for every request.
--
-- Per request, one action (`lua.plinth_grpc` / `lua.plinth_http`) checks the method against the
-- allowlist, the bearer key against the pushed grants, finds the deployment's route, picks a
-- version by weight (or by a hash of `x-plinth-sticky`), enforces the deployment's limits and
-- tells HAProxy which backend to use; it answers refusals itself (`txn:done`). The filter
-- `lua.plinth` rewrites what must change in the bodies: a gRPC request (exactly one message:
-- anything past it is refused or dropped) gets Triton's model name and version put right after
-- the message (for a non-repeated protobuf field the last occurrence wins) and its 5-byte
-- length prefix fixed; a response gets the deployment's name and version back in place,
-- with the same length (the freed bytes become an unknown protobuf field, or JSON whitespace),
-- so no length prefix or content-length changes on the way back.
--
-- The control plane replaces the routing and grant tables through the runtime API:
-- `plinth load routes|grants <file>` parses the whole file first and swaps the table only if
-- it is valid, so a bad update keeps the last good one.

local routes = {}    -- deployment -> route (see parse_routes)
local grants = {}    -- key id -> {salt, hash (upper-case hex), principal, deployments, expires}
local verified = {}  -- full bearer token -> key id, for tokens whose hash matched
local verified_n = 0
local VERIFIED_MAX = 10000
local stats = {}     -- "deployment/version" -> counters and latency buckets
local rejected = {}  -- deployment -> refusals at the limits
-- HAProxy's own 5xx answers on a stream without the filter (a direct backend, when Triton does
-- not accept or a request times out in the queue) run no Lua: they are found as the slot
-- backend's hrsp_5xx beyond the 5xx answers this script recorded itself (seen_5xx), and
-- counted to the route's direct version when the counters are read (see fold_unseen).
local seen_5xx = {}  -- slot backend -> 5xx answers recorded here
local folded = {}    -- slot backend -> HAProxy's own 5xx answers already counted
local routes_rev, grants_rev = "0", "0"
-- What the action decided for a request, for the filter of the same stream: one integer
-- variable (txn.pl_id) carries the key, which is cheaper than a variable per value. Entries are
-- removed when the response headers pass; a sweep drops those of streams that ended earlier.
local inflight = {}
local next_id = 0
-- The last decision of each HAProxy thread, for Plinth:new (which gets no txn): a stream goes
-- from its action to its backend, where the filter is made, without yielding in between, so
-- the slot of the thread still holds that stream's decision.
local admitted = {}
-- Requests admitted and not ended, state table -> its Triton model, for `plinth inflight`
-- (the control plane unloads a version once nothing is in flight on it). Released when the
-- response's analysis ends (also on an abort); weak keys so that a state whose stream went
-- without telling the filter stops counting once collected.
local live = setmetatable({}, {__mode = "k"})

-- Latency bucket upper bounds in milliseconds (the last bucket is +Inf).
local BOUNDS = {0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750,
                1000, 2000, 5000, 10000}
local NBUCKETS = #BOUNDS + 1

local GRPC = "/inference.GRPCInferenceService/"
-- method -> true when the request names a model (field 1) and so needs a route
local GRPC_METHODS = {
  ServerLive = false, ServerReady = false,
  ModelReady = true, ModelMetadata = true, ModelInfer = true,
}
-- gRPC status codes that are the server's fault (counted as errors of the version)
local SERVER_ERROR = {["2"] = true, ["4"] = true, ["10"] = true, ["12"] = true, ["13"] = true,
                      ["14"] = true, ["15"] = true}

-- ---------------------------------------------------------------- protobuf helpers

local function varint(n)
  local out = {}
  while n >= 0x80 do
    out[#out + 1] = string.char((n & 0x7f) | 0x80)
    n = n >> 7
  end
  out[#out + 1] = string.char(n)
  return table.concat(out)
end

local function read_varint(s, pos)
  local n, shift = 0, 0
  while true do
    local b = s:byte(pos)
    if b == nil or shift > 28 then return nil, pos end
    n = n | ((b & 0x7f) << shift)
    pos = pos + 1
    if b < 0x80 then return n, pos end
    shift = shift + 7
  end
end

local function pb_string(field, value)
  return varint((field << 3) | 2) .. varint(#value) .. value
end

-- Fields 1 and 2 (strings) of a message whose bytes start at `pos` in `s`; stops at the first
-- other field, as every serializer writes fields in number order. Returns name, version, and
-- the position after them; nil name when field 1 does not come first.
local function head_fields(s, pos)
  local name, version
  while true do
    local tag, p = read_varint(s, pos)
    if tag ~= 10 and tag ~= 18 then break end
    local len, q = read_varint(s, p)
    if len == nil or q + len - 1 > #s then break end
    local value = s:sub(q, q + len - 1)
    if tag == 10 then name = value else version = value end
    pos = q + len
  end
  return name, version, pos
end

-- A filler of exactly `n` (>= 3) bytes that protobuf parsers skip: field 2047, length-delimited.
local function pb_filler(n)
  -- tag 2047<<3|2 = 16378 -> 2 bytes; a 1-byte length covers n <= 130
  return "\xfa\x7f" .. string.char(n - 3) .. string.rep(" ", n - 3)
end

local function be32(n)
  return string.char((n >> 24) & 0xff, (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff)
end

-- ---------------------------------------------------------------- tables from files

local function split(line, sep)
  local out = {}
  for field in (line .. sep):gmatch("(.-)" .. sep) do out[#out + 1] = field end
  return out
end

-- routes file, tab-separated:
--   R <deployment> <backend> <max_concurrency> <max_queue>
--   B <triton model> <triton version> <version label> <weight>     (after its R line)
local function parse_routes(text)
  local parsed, current, count = {}, nil, 0
  for line in text:gmatch("[^\n]+") do
    local f = split(line, "\t")
    if f[1] == "R" and #f == 5 then
      current = {name = f[2], backend = f[3], maxc = tonumber(f[4]), maxq = tonumber(f[5]),
                 versions = {}, total = 0, by_label = {}}
      if current.maxc == nil or current.maxq == nil then return nil, "bad limits: " .. line end
      parsed[f[2]] = current
      count = count + 1
    elseif f[1] == "B" and #f == 5 and current ~= nil then
      local weight = tonumber(f[5])
      if weight == nil or weight < 0 then return nil, "bad weight: " .. line end
      local v = {model = f[2], tver = f[3], label = f[4], weight = weight,
                 key = current.name .. "/" .. f[4], backend = current.backend}
      v.tail = pb_string(1, v.model) .. pb_string(2, v.tver)
      v.res_infer = pb_string(1, current.name) .. pb_string(2, v.label)
      v.internal_infer = v.tail
      v.res_meta = pb_string(1, current.name)
      v.internal_meta = pb_string(1, v.model)
      v.json_infer = '"model_name":"' .. v.model .. '","model_version":"' .. v.tver .. '"'
      v.jsonout_infer = '"model_name":"' .. current.name .. '","model_version":"' .. v.label .. '"'
      v.json_meta = '"name":"' .. v.model .. '"'
      v.jsonout_meta = '"name":"' .. current.name .. '"' 
      -- A backend whose Triton model is the deployment's own name, with the version label
      -- as Triton's version, needs no rewrite either way: a request passes as it came (an
      -- empty version gets the model's only one) and Triton's answer already names the
      -- deployment and version. Such streams skip the filter (see Plinth:new).
      v.direct = v.model == current.name and v.tver == v.label
      if v.direct then
        current.direct = current.direct or v
        v.tail, v.res_infer, v.internal_infer, v.res_meta, v.internal_meta = nil, nil, nil, nil, nil
        v.json_infer, v.jsonout_infer, v.json_meta, v.jsonout_meta = nil, nil, nil, nil
      end
      current.total = current.total + weight
      v.upto = current.total
      current.versions[#current.versions + 1] = v
      current.by_label[v.label] = v
    elseif f[1] == "V" and #f == 2 then
      -- revision line
    else
      return nil, "unreadable line: " .. line
    end
  end
  for name, r in pairs(parsed) do
    if #r.versions == 0 then return nil, "deployment " .. name .. " has no version" end
  end
  return parsed, count
end

-- grants file, tab-separated:
--   K <key id> <salt> <sha256 hex> <principal> <expires epoch seconds or -> <dep,dep,...>
local function parse_grants(text)
  local parsed, count = {}, 0
  for line in text:gmatch("[^\n]+") do
    local f = split(line, "\t")
    if f[1] == "K" and #f == 7 then
      local deps = {}
      for d in f[7]:gmatch("[^,]+") do deps[d] = true end
      local expires = nil
      if f[6] ~= "-" then
        expires = tonumber(f[6])
        if expires == nil then return nil, "bad expiry: " .. line end
      end
      parsed[f[2]] = {salt = f[3], hash = f[4]:upper(), principal = f[5], deployments = deps,
                      expires = expires}
      count = count + 1
    elseif f[1] == "V" and #f == 2 then
    else
      return nil, "unreadable line: " .. f[1]
    end
  end
  return parsed, count
end

-- Counts one answer of `version` that took `ms` milliseconds.
local function tally(version, ms, failed)
  local key = version.key
  local s = stats[key]
  if s == nil then
    s = {requests = 0, errors = 0, sum_ms = 0.0, buckets = {}}
    for i = 1, NBUCKETS do s.buckets[i] = 0 end
    stats[key] = s
  end
  s.requests = s.requests + 1
  if failed then s.errors = s.errors + 1 end
  s.sum_ms = s.sum_ms + ms
  local i = 1
  while i < NBUCKETS and ms > BOUNDS[i] do i = i + 1 end
  s.buckets[i] = s.buckets[i] + 1
end

-- Counts the 5xx answers HAProxy gave itself on direct streams since the last call as errors
-- of each route's direct version (their time is not measured: they count in the lowest
-- latency bucket, which is where a refused connection's answer falls). Called before the
-- counters are read and before the routes change, so that each lands on the version that was
-- direct when it happened (to within one read).
local function fold_unseen()
  for _, route in pairs(routes) do
    local version = route.direct
    local proxy = version and core.backends[route.backend]
    if proxy then
      local backend = route.backend
      local unseen = (tonumber(proxy:get_stats().hrsp_5xx) or 0) - (seen_5xx[backend] or 0)
      local done = folded[backend] or 0
      -- (HAProxy may count an answer a moment after this script did: never count back)
      for _ = done + 1, unseen do tally(version, 0.0, true) end
      if unseen > done then folded[backend] = unseen end
    end
  end
end

local function read_file(path)
  local file, err = io.open(path, "rb")
  if file == nil then return nil, err end
  local text = file:read("a")
  file:close()
  return text
end

core.register_cli({"plinth", "load"}, "plinth load routes|grants <file> <revision>: swap a table",
  function(applet, _, _, what, path, revision)
    local text, err = read_file(path or "")
    if text == nil then
      applet:send("error cannot read " .. tostring(path) .. ": " .. tostring(err) .. "\n")
      return
    end
    local parsed, count
    if what == "routes" then
      parsed, count = parse_routes(text)
      if parsed ~= nil then
        fold_unseen()
        routes = parsed; routes_rev = revision or "?"
      end
    elseif what == "grants" then
      parsed, count = parse_grants(text)
      if parsed ~= nil then
        grants = parsed; grants_rev = revision or "?"
        verified = {}; verified_n = 0
      end
    else
      applet:send("error unknown table " .. tostring(what) .. "\n")
      return
    end
    if parsed == nil then
      applet:send("error " .. count .. "\n")
    else
      applet:send("ok " .. what .. " " .. count .. "\n")
    end
  end)

-- One line per version: key requests errors sum_ms b1 .. bN; then R lines for refusals.
core.register_cli({"plinth", "stats"}, "plinth stats: per-version counters", function(applet)
  fold_unseen()
  local out = {"revisions " .. routes_rev .. " " .. grants_rev}
  for key, s in pairs(stats) do
    out[#out + 1] = string.format("S %s %d %d %.3f %s", key, s.requests, s.errors, s.sum_ms,
                                  table.concat(s.buckets, " "))
  end
  for name, n in pairs(rejected) do out[#out + 1] = string.format("X %s %d", name, n) end
  applet:send(table.concat(out, "\n") .. "\n")
end)

-- One line per Triton model with requests in flight: F <triton model> <count>.
core.register_cli({"plinth", "inflight"}, "plinth inflight: requests in flight per Triton model",
  function(applet)
    local counts = {}
    for _, model in pairs(live) do counts[model] = (counts[model] or 0) + 1 end
    local out = {"inflight"}
    for model, n in pairs(counts) do out[#out + 1] = string.format("F %s %d", model, n) end
    applet:send(table.concat(out, "\n") .. "\n")
  end)

-- Prometheus text for /metrics/deployments on the stats port.
core.register_service("plinth_metrics", "http", function(applet)
  fold_unseen()
  local out = {
    "# HELP plinth_inference_requests_total Requests answered, per deployment version.",
    "# TYPE plinth_inference_requests_total counter",
  }
  local errors = {
    "# HELP plinth_inference_errors_total Server errors, per deployment version.",
    "# TYPE plinth_inference_errors_total counter",
  }
  local hist = {
    "# HELP plinth_inference_duration_seconds Latency through the data plane.",
    "# TYPE plinth_inference_duration_seconds histogram",
  }
  for key, s in pairs(stats) do
    local dep, ver = key:match("^(.-)/(.*)$")
    local labels = 'deployment="' .. dep .. '",version="' .. ver .. '"'
    out[#out + 1] = "plinth_inference_requests_total{" .. labels .. "} " .. s.requests
    errors[#errors + 1] = "plinth_inference_errors_total{" .. labels .. "} " .. s.errors
    local cumulative = 0
    for i = 1, NBUCKETS do
      cumulative = cumulative + s.buckets[i]
      local le = BOUNDS[i] and string.format("%g", BOUNDS[i] / 1000) or "+Inf"
      hist[#hist + 1] = "plinth_inference_duration_seconds_bucket{" .. labels .. ',le="' ..
        le .. '"} ' .. cumulative
    end
    hist[#hist + 1] = "plinth_inference_duration_seconds_sum{" .. labels .. "} " ..
      string.format("%.6f", s.sum_ms / 1000)
    hist[#hist + 1] = "plinth_inference_duration_seconds_count{" .. labels .. "} " .. s.requests
  end
  local refused = {
    "# HELP plinth_inference_refused_total Requests refused at a deployment's limits.",
    "# TYPE plinth_inference_refused_total counter",
  }
  for name, n in pairs(rejected) do
    refused[#refused + 1] = 'plinth_inference_refused_total{deployment="' .. name .. '"} ' .. n
  end
  local body = table.concat(out, "\n") .. "\n" .. table.concat(errors, "\n") .. "\n" ..
    table.concat(hist, "\n") .. "\n" .. table.concat(refused, "\n") .. "\n"
  applet:set_status(200)
  applet:add_header("content-type", "text/plain; version=0.0.4")
  applet:add_header("content-length", tostring(#body))
  applet:start_response()
  applet:send(body)
end)

-- ---------------------------------------------------------------- per-request decisions

-- grpc-message as the gRPC spec wants it: printable ASCII except '%' as is, every other byte
-- percent-encoded, so the client's bytes that a refusal repeats (a path, a model name) can
-- neither break the header nor forge another; cut to a bounded length first.
local function grpc_message(message)
  return (message:sub(1, 400):gsub("[^\x20-\x24\x26-\x7e]", function(c)
    return string.format("%%%02X", c:byte())
  end))
end

local function grpc_refuse(txn, code, message)
  local reply = txn:reply({status = 200,
    headers = {["content-type"] = {"application/grpc"}, ["grpc-status"] = {tostring(code)},
               ["grpc-message"] = {grpc_message(message)}}})
  txn:done(reply)
end

local HTTP_FOR_GRPC = {[16] = 401, [5] = 404, [8] = 429, [12] = 404, [3] = 400}

local function http_refuse(txn, code, message)
  -- the client's bytes it may repeat: no control, quote, backslash or non-ASCII byte
  local body = '{"error":"' .. message:sub(1, 400):gsub('[%c"\\\x80-\xff]', "") .. '"}'
  local status = HTTP_FOR_GRPC[code] or 400
  local headers = {["content-type"] = {"application/json"}}
  if status == 401 then headers["www-authenticate"] = {'Bearer realm="plinth"'} end
  txn:done(txn:reply({status = status, headers = headers, body = body}))
end

-- The key id of a valid bearer token, or nil and why not.
local function authenticate(txn)
  local header = txn.f:req_hdr("authorization")
  if header == nil or header == "" then return nil, "no API key was sent (authorization: Bearer plk_...)" end
  local token = header:match("^[Bb]earer%s+(%S+)$")
  if token == nil then return nil, "the authorization header is not a bearer token" end
  local key_id = verified[token]
  local grant
  if key_id ~= nil then
    grant = grants[key_id]
  else
    key_id = token:match("^plk_(%x+)_")
    if key_id == nil then return nil, "the API key is malformed" end
    grant = grants[key_id]
    if grant == nil then return nil, "the API key is unknown or revoked" end
    local secret = token:sub(#key_id + 6)
    local digest = txn.c:hex(txn.c:sha2(grant.salt .. ":" .. secret, 256))
    if digest ~= grant.hash then return nil, "the API key is unknown or revoked" end
    if verified_n >= VERIFIED_MAX then verified = {}; verified_n = 0 end
    verified[token] = key_id
    verified_n = verified_n + 1
  end
  if grant == nil then return nil, "the API key is unknown or revoked" end
  -- core.now() is HAProxy's cached clock (it may lag by a fraction of a second): near the
  -- expiry the wall clock (a sample fetch) decides.
  if grant.expires ~= nil and grant.expires < core.now().sec + 2
      and grant.expires <= txn.f:date() then
    return nil, "the API key has expired"
  end
  return key_id, grant
end

-- FNV-1a of a short string (the sticky header), for a stable version choice.
local function fnv(s)
  local h = 2166136261
  for i = 1, #s do h = ((h ~ s:byte(i)) * 16777619) & 0xffffffff end
  return h
end

-- The route and version for `name` (asked by `grant`), or nil, gRPC code, message.
local function choose(txn, grant, name, pinned)
  local route = routes[name]
  if route == nil or not grant.deployments[name] then
    return nil, 5, "deployment '" .. name .. "' not found"
  end
  local version
  if pinned ~= nil and pinned ~= "" then
    version = route.by_label[pinned]
    if version == nil then
      return nil, 5, "version " .. pinned .. " of deployment '" .. name .. "' is not served"
    end
  elseif #route.versions == 1 then
    version = route.versions[1]
  else
    local sticky = txn.f:req_hdr("x-plinth-sticky")
    local point
    if route.total <= 0 then
      point = 0
    elseif sticky ~= nil and sticky ~= "" then
      point = fnv(sticky) % route.total
    else
      point = math.random(0, route.total - 1)
    end
    for _, v in ipairs(route.versions) do
      if point < v.upto then version = v; break end
    end
    version = version or route.versions[#route.versions]
  end
  if route.maxc > 0 and txn.f:be_conn(route.backend) >= route.maxc + route.maxq then
    rejected[name] = (rejected[name] or 0) + 1
    return nil, 8, "deployment '" .. name .. "' is at its limit of " .. route.maxc ..
      " concurrent requests" .. (route.maxq > 0 and (" and " .. route.maxq .. " queued") or "")
  end
  return route, version
end

-- Remembers the decision for the filter; returns the state table.
local function admit(txn, route, version)
  next_id = next_id + 1
  local now = core.now()
  local st = {version = version, t0 = now.sec * 1000.0 + now.usec / 1000.0}
  inflight[next_id] = st
  live[st] = version.model
  txn:set_var("txn.pl_backend", route.backend)
  txn:set_var("txn.pl_id", next_id)
  if version.direct then
    st.direct = true
    txn:set_var("txn.pl_direct", true)  -- the slot's response rule records it (plinth_done)
  end
  admitted[core.thread] = st
  return st
end

core.register_action("plinth_grpc", {"http-req"}, function(txn)
  local path = txn.f:path()
  local method = path:sub(1, #GRPC) == GRPC and path:sub(#GRPC + 1) or nil
  local named = method and GRPC_METHODS[method]
  if named == nil then
    return grpc_refuse(txn, 12, "method " .. path .. " is not served here")
  end
  local key_id, grant = authenticate(txn)
  if key_id == nil then return grpc_refuse(txn, 16, grant) end
  if not named then
    txn:set_var("txn.pl_backend", "triton_grpc")
    return
  end
  local body = txn.f:req_body() or ""
  if #body < 5 then return grpc_refuse(txn, 3, "the request carries no message") end
  if body:byte(1) ~= 0 then
    return grpc_refuse(txn, 3, "compressed requests are not supported; send them uncompressed")
  end
  -- These methods are unary: the body is exactly one message of 5 + len bytes. Bytes past it
  -- (a second message) would otherwise reach Triton inside the first once the filter has
  -- grown its length prefix, and could name another model there (the last field 1 wins).
  -- The action sees at least the first 512 bytes; the filter drops anything past 5 + len
  -- that arrives later.
  local len = (body:byte(2) << 24) | (body:byte(3) << 16) | (body:byte(4) << 8) | body:byte(5)
  if #body > 5 + len then
    return grpc_refuse(txn, 3, method .. " is unary: the request must be exactly one message")
  end
  local name, pinned = head_fields(body, 6)
  if name == nil or name == "" then return grpc_refuse(txn, 3, "the request names no model") end
  local route, version, message = choose(txn, grant, name, pinned)
  if route == nil then return grpc_refuse(txn, version, message) end
  local st = admit(txn, route, version)
  -- what the filter appends, and the names it writes back into the response
  st.tail = version.tail
  st.len = len
  if method == "ModelInfer" then
    st.res, st.internal = version.res_infer, version.internal_infer
  elseif method == "ModelMetadata" then
    st.res, st.internal = version.res_meta, version.internal_meta
  end
end)

-- REST: /v2/health/{live,ready}, /v2/models/<name>[/versions/<v>][/ready|/infer] (metadata on
-- GET of the model itself). Anything else (repository, statistics, shared memory, logs, trace)
-- is refused.
core.register_action("plinth_http", {"http-req"}, function(txn)
  local path = txn.f:path()
  local method = txn.f:method()
  if path == "/v2/health/live" or path == "/v2/health/ready" or path == "/v2" then
    local key_id, grant = authenticate(txn)
    if key_id == nil then return http_refuse(txn, 16, grant) end
    txn:set_var("txn.pl_backend", "triton_http")
    return
  end
  local name, rest = path:match("^/v2/models/([^/]+)(.*)$")
  local pinned, verb
  if name ~= nil then
    local v, tail = rest:match("^/versions/([^/]+)(.*)$")
    if v ~= nil then pinned, rest = v, tail end
    if rest == "" and method == "GET" then verb = ""
    elseif rest == "/ready" and method == "GET" then verb = "/ready"
    elseif rest == "/infer" and method == "POST" then verb = "/infer" end
  end
  if verb == nil then return http_refuse(txn, 5, "no such endpoint: " .. method .. " " .. path) end
  local key_id, grant = authenticate(txn)
  if key_id == nil then return http_refuse(txn, 16, grant) end
  local route, version, message = choose(txn, grant, name, pinned)
  if route == nil then return http_refuse(txn, version, message) end
  local st = admit(txn, route, version)
  st.rest, st.name = true, name
  txn.http:req_set_path("/v2/models/" .. version.model .. "/versions/" .. version.tver .. verb)
  if verb == "/infer" then
    st.json, st.jsonout = version.json_infer, version.jsonout_infer
  elseif verb == "" then
    st.json, st.jsonout = version.json_meta, version.jsonout_meta
  end
end)

-- ---------------------------------------------------------------- the body filter

-- Counts the answer of an admitted request; `http_5xx`: its HTTP status was 5xx (counted by
-- HAProxy too, see fold_unseen).
local function record(st, failed, http_5xx)
  local now = core.now()
  local ms = now.sec * 1000.0 + now.usec / 1000.0 - st.t0
  if ms < 0 then ms = 0.0 end
  st.recorded = true
  tally(st.version, ms, failed)
  if http_5xx then
    local backend = st.version.backend
    seen_5xx[backend] = (seen_5xx[backend] or 0) + 1
  end
end

-- The answer of a stream that skipped the filter (a direct backend, see parse_routes), from
-- its headers: one Lua entry instead of the filter's five. A gRPC error that Triton sends in
-- the trailers after headers is invisible here (Triton answers a failed unary call
-- trailers-only, with the status in the headers, so only a streaming answer could). HAProxy's
-- own 5xx answer (Triton not accepting) runs no Lua at all on such a stream (2.6 has no
-- http-after-response Lua action): fold_unseen counts it from HAProxy's counters, and its
-- request stays in flight until the sweep drops its decision (a drain waits for it at most
-- the drain timeout).
core.register_action("plinth_done", {"http-res"}, function(txn)
  local id = txn:get_var("txn.pl_id")
  local st = id ~= nil and inflight[id] or nil
  if st == nil then return end
  inflight[id] = nil
  live[st] = nil
  local grpc_status = txn.f:res_hdr("grpc-status")
  local status = txn.f:status()
  if grpc_status ~= nil then
    record(st, SERVER_ERROR[grpc_status] or false, status >= 500)
  else
    record(st, status >= 500, status >= 500)
  end
end)

local Plinth = {}
Plinth.id = "plinth"
Plinth.flags = filter.FLT_CFG_FL_HTX
Plinth.__index = Plinth

function Plinth:new()
  -- A stream with nothing to rewrite gets no filter at all (returning no table leaves the
  -- stream unfiltered): each callback is a Lua entry of 15-30 us, which is what the data
  -- plane costs beyond plain HAProxy. Its answer is recorded by plinth_done instead.
  local thread = core.thread
  local st = admitted[thread]
  admitted[thread] = nil
  if st ~= nil and st.direct then return nil end
  return setmetatable({}, Plinth)
end

function Plinth:http_headers(txn, msg)
  local chn = msg.channel
  if not chn:is_resp() then
    local id = txn:get_var("txn.pl_id")
    if id == nil then return end
    local st = inflight[id]
    if st == nil then return end
    inflight[id] = nil
    self.st = st
    if st.tail ~= nil then filter.register_data_filter(self, chn) end
    return
  end
  local st = self.st
  if st == nil then return end
  local grpc_status = txn.f:res_hdr("grpc-status")
  local status = txn.f:status()
  local failed
  if grpc_status ~= nil then  -- a trailers-only gRPC answer: an error (or an empty OK)
    failed = SERVER_ERROR[grpc_status] or false
  else
    failed = status >= 500
  end
  if status == 200 and grpc_status == nil and not st.rest then
    -- A gRPC answer with headers first: its status comes in the trailers, which HAProxy 2.6
    -- shows no filter or fetch. A unary OK always carries its one message, so an answer that
    -- ends without a body byte is an error (Triton sends its refusals of bad requests
    -- trailers-only, so they are not counted here): recorded in http_end.
    self.await = true
    filter.register_data_filter(self, chn)
    return
  end
  record(st, failed, status >= 500)
  if status == 200 and grpc_status == nil and (st.res ~= nil or st.json ~= nil) then
    filter.register_data_filter(self, chn)
  elseif status >= 400 and st.rest then
    st.res, st.json = nil, nil
    filter.register_data_filter(self, chn)  -- Triton's error names its own model
  end
end

function Plinth:http_end(txn, msg)
  if self.await and msg.channel:is_resp() then
    self.await = false
    record(self.st, not self.got_body, false)
  end
end

function Plinth:http_payload(txn, msg)
  local st = self.st
  if msg.channel:is_resp() then
    -- (input() also counts the trailers: look at the data itself)
    if not self.got_body then
      local first = msg:body(0, 1)
      if first ~= nil and #first > 0 then self.got_body = true end
    end
    if self.rewritten then return end
    if st.res ~= nil then
      -- <5-byte prefix><field 1 internal name><field 2 triton version>...: overwrite the two
      -- fields with the deployment's name and version plus a filler of the same total length.
      local internal = st.internal
      local head = msg:body(0, 5 + #internal)
      if head == nil or #head < 5 + #internal then return end
      local want = st.res
      local filler = #internal - #want
      if head:sub(6) == internal and filler >= 3 and filler <= 130 then
        msg:set(want .. pb_filler(filler), 5, #internal)
      end
    elseif st.json ~= nil then
      local head = msg:body(0, 512) or ""
      local at = head:find(st.json, 1, true)
      if at ~= nil then
        msg:set(st.jsonout .. string.rep(" ", #st.json - #st.jsonout), at - 1, #st.json)
      end
    elseif not st.rest then
      -- a gRPC answer with nothing to rewrite (ModelReady), filtered for its end only
    elseif msg:eom() then
      -- a small JSON error body, whole: the deployment's name instead of Triton's, padded
      -- with trailing whitespace so that content-length still holds
      local body = msg:body(0, -1) or ""
      local fixed = body:gsub(st.version.model:gsub("%p", "%%%0"), st.name)
      if #fixed < #body then msg:set(fixed .. string.rep(" ", #body - #fixed)) end
    else
      return
    end
    self.rewritten = true
    -- (a gRPC answer keeps the filter to its end: see http_headers)
    if not self.await then filter.unregister_data_filter(self, msg.channel) end
    return
  end
  -- request: fix the length prefix on the first data, put the tail right after the message's
  -- last byte (5 + len into the body) and forward nothing past it. Each call sees the data
  -- that arrived since the last one (what a call leaves is forwarded).
  local avail = msg:input()
  if not self.prefixed then
    msg:set(be32(st.len + #st.tail), 1, 4)
    self.prefixed, self.seen = true, 0
  end
  if not self.tailed then
    local left = 5 + st.len - self.seen
    if avail >= left then
      msg:insert(st.tail, left)
      if avail > left then msg:remove(left + #st.tail, avail - left) end
      self.tailed = true
    else
      self.seen = self.seen + avail
    end
  elseif avail > 0 then
    msg:remove(0, avail)
  end
  -- (a body shorter than its prefix reaches Triton short, without the tail: it refuses it)
  if msg:eom() then filter.unregister_data_filter(self, msg.channel) end
end

-- The end of the response's analysis (after its last byte, or an abort): the request is no
-- longer in flight on its Triton model.
function Plinth:end_analyze(txn, chn)
  if not chn:is_resp() then return end
  local st = self.st
  if st == nil then
    local id = txn:get_var("txn.pl_id")
    st = id ~= nil and inflight[id] or nil
    if st == nil then return end
    inflight[id] = nil
  end
  live[st] = nil
  -- HAProxy's own 5xx answer (503 when Triton does not accept, 504 on its timeout) passes no
  -- other callback: the slot's http-after-response rule marks it (txn.pl_5xx), and it is the
  -- version's error all the same (once: an answer already recorded is not counted again).
  if not st.recorded and txn:get_var("txn.pl_5xx") ~= nil then record(st, true, true) end
end

core.register_filter("plinth", Plinth, function(flt)
  return flt
end)

-- Drops the decisions of requests whose stream ended before the filter took them (a client
-- that went away while its request waited for its body).
core.register_task(function()
  local seen = {}
  while true do
    core.sleep(30)
    local stale = seen
    seen = {}
    for id in pairs(inflight) do
      if stale[id] then inflight[id] = nil else seen[id] = true end
    end
  end
end)
