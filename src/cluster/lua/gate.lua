-- One round trip per batch: settle what the node's commits reported, then decide every request.
-- ARGV: generation, now (ms), n settled, n × (id, status, expires ms or ''),
--       n requests, n × (id, user, quantity, idempotency key or '').
-- Returns: { 'OK', stock, held, sold, inflight, next hold expiry or '', one outcome per request }.
local bad = check_generation(ARGV[1])
if bad then return bad end
local now = tonumber(ARGV[2])
local m = redis.call('HMGET', KEYS[1], 'kind', 'limit', 'maxreq', 'opens', 'closes', 'closed')
local kind, limit, maxreq = m[1], tonumber(m[2]), tonumber(m[3])
local opens, closes, closed = tonumber(m[4]), tonumber(m[5]), m[6] == '1'

local i = 4
for _ = 1, tonumber(ARGV[3]) do
  sync(ARGV[i], ARGV[i + 1], ARGV[i + 2], kind)
  i = i + 3
end

local function decide(id, user, qty, key)
  local idem = nil
  if key ~= '' then
    idem = user .. SEP .. key
    local first = redis.call('HGET', KEYS[4], idem)
    if first then
      local at = string.find(first, SEP, 1, true)
      local fid, fqty = string.sub(first, 1, at - 1), string.sub(first, at + 1)
      if tonumber(fqty) ~= qty then return 'REUSED:' .. fqty end
      local raw = redis.call('HGET', KEYS[2], fid)
      if raw and string.sub(raw, 1, 4) == 'new' .. SEP then return 'IN_FLIGHT' end
      return 'REPLAY:' .. fid
    end
  end
  if closed or (closes and now >= closes) then return 'CLOSED' end
  if opens and now < opens then return 'NOT_OPEN' end
  if qty > maxreq then return 'OVER_MAX:' .. maxreq end
  local active = tonumber(redis.call('HGET', KEYS[3], user) or '0')
  if active + qty > limit then return 'LIMIT:' .. limit end
  local c = redis.call('HMGET', KEYS[1], 'stock', 'held', 'sold')
  local remaining = tonumber(c[1]) - tonumber(c[2]) - tonumber(c[3])
  if remaining <= 0 then return 'SOLD_OUT' end
  if remaining < qty then return 'INSUFFICIENT:' .. remaining end
  redis.call('HINCRBY', KEYS[1], bucket('new', kind), qty)
  redis.call('HINCRBY', KEYS[1], 'inflight', 1)
  redis.call('HINCRBY', KEYS[3], user, qty)
  redis.call('HSET', KEYS[2], id, 'new' .. SEP .. qty .. SEP .. user .. SEP .. key)
  redis.call('ZADD', KEYS[5], now, id)
  if idem then redis.call('HSET', KEYS[4], idem, id .. SEP .. qty) end
  return 'OK'
end

local n = tonumber(ARGV[i])
i = i + 1
local out = { 'OK' }
for _ = 1, n do
  out[#out + 1] = decide(ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3])
  i = i + 4
end
local c = counts()
for k = 1, 5 do table.insert(out, 1 + k, c[k]) end
return out
