-- Takes the holds due at `now` off the expiry queue and marks them pending, so whichever node
-- took them (or, if it dies, the reconciler) settles each with what its row says.
-- ARGV: generation, now (ms), most to take.
-- Returns { 'OK', stock, held, sold, inflight, next expiry or '', ids… }.
local bad = check_generation(ARGV[1])
if bad then return bad end
local due = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[6], id)
  redis.call('ZADD', KEYS[5], ARGV[2], id)
end
local out = { 'OK' }
local c = counts()
for k = 1, 5 do out[#out + 1] = c[k] end
for _, id in ipairs(due) do out[#out + 1] = id end
return out
