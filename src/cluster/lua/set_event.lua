-- An admin change. ARGV: generation, stock, limit, max per request, opens ms or '', closes ms
-- or '', closed '0'/'1'. Refuses a stock below what is held and sold.
-- Returns { 'OK', stock, held, sold, inflight, next expiry or '' } or { 'BELOW', held + sold }.
local bad = check_generation(ARGV[1])
if bad then return bad end
local c = redis.call('HMGET', KEYS[1], 'held', 'sold')
local taken = tonumber(c[1]) + tonumber(c[2])
if tonumber(ARGV[2]) < taken then return { 'BELOW', tostring(taken) } end
redis.call('HSET', KEYS[1], 'stock', ARGV[2], 'limit', ARGV[3], 'maxreq', ARGV[4],
  'opens', ARGV[5], 'closes', ARGV[6], 'closed', ARGV[7])
local out = { 'OK' }
local n = counts()
for k = 1, 5 do out[#out + 1] = n[k] end
return out
