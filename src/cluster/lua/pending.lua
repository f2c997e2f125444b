-- Reconciliation. ARGV: generation, mode, …
--   mode 'intent', ids…: marks reservations pending before a status change is written, so a
--     node that dies between the write and its report leaves them to the reconciler.
--   mode 'stale', older than (ms), most: pending entries older than that, each as
--     { id, entry or '' }.
--   mode 'settle', n × (id, status, expires ms or ''): brings entries to what their rows say.
-- Returns { 'OK', stock, held, sold, inflight, next expiry or '', … }.
local bad = check_generation(ARGV[1])
if bad then return bad end
local mode = ARGV[2]
local out = { 'OK' }
if mode == 'intent' then
  local now = redis.call('TIME')[1] * 1000
  for k = 3, #ARGV do redis.call('ZADD', KEYS[5], now, ARGV[k]) end
elseif mode == 'stale' then
  local ids = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
  for _, id in ipairs(ids) do
    out[#out + 1] = id
    out[#out + 1] = redis.call('HGET', KEYS[2], id) or ''
  end
elseif mode == 'settle' then
  local kind = redis.call('HGET', KEYS[1], 'kind')
  for k = 3, #ARGV, 3 do sync(ARGV[k], ARGV[k + 1], ARGV[k + 2], kind) end
end
local c = counts()
for k = 1, 5 do table.insert(out, 1 + k, c[k]) end
return out
